"""Request and token quotas, as a Beam `RateLimiter`.

Beam ships one limiter (`EnvoyRateLimiter`, a global limit through an Envoy rate-limit
service) and counts elements, not tokens. Model quotas are requests *and* tokens per
minute, so this module adds a token bucket over both.

How a job-wide limit is split (the rule the CLI documents):

    per-VM limit = job limit / number of VMs

where the number of VMs is `--max_num_workers` (else `--num_workers`, else 1; the
DirectRunner is one VM however many worker processes it runs). All SDK processes of a
VM share one bucket through `MultiProcessShared`, so the split does not depend on how
many processes or threads Dataflow starts per VM. An autoscaled job that runs with fewer
VMs than `--max_num_workers` stays under quota but uses less of it; for a limit that
holds exactly whatever the worker count, use the Envoy option.

Why not `pyrate-limiter` or `aiolimiter`: the bucket has to live in one process per VM
behind a `MultiProcessShared` proxy, so every call is a cross-process RPC. A reservation
bucket (one call returns how long to wait; the caller sleeps locally) keeps that to one
RPC per request and never blocks the proxy server; neither library has that shape.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
from typing import Optional

from apache_beam.io.components.rate_limiter import EnvoyRateLimiter
from apache_beam.io.components.rate_limiter import RateLimiter
from apache_beam.utils.multi_process_shared import MultiProcessShared


class TokenBucket:
    """A bucket over requests and tokens per minute that hands out reservations.

    `reserve` takes what a request needs now (the level may go negative: that debt is
    the queue) and returns how many seconds the caller must wait before sending, so
    concurrent callers are served in arrival order.

    Quotas are checked over any 60-second window, and a bucket lets through at most
    `capacity + 60 * rate` in one: so the refill rate is `(limit - capacity) / 60`,
    which keeps every window within the limit while a cold start still goes out at once.
    """

    def __init__(self, requests_per_minute: Optional[float],
                 tokens_per_minute: Optional[float], burst_seconds: float = 1.0,
                 clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._rates = {}  # kind -> per second
        self._capacity = {}
        self._level = {}
        for kind, per_minute in (("requests", requests_per_minute),
                                 ("tokens", tokens_per_minute)):
            if per_minute:
                if per_minute <= 0:
                    raise ValueError(f"{kind} per minute must be positive")
                # A bucket of `burst_seconds` of quota (at least one unit) lets a cold
                # start go out at once.
                capacity = min(per_minute / 2, max(1.0, per_minute / 60 * burst_seconds))
                self._capacity[kind] = capacity
                self._rates[kind] = (per_minute - capacity) / 60.0
                self._level[kind] = capacity
        self._updated = clock()

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        self._updated = now
        for kind, rate in self._rates.items():
            self._level[kind] = min(self._capacity[kind],
                                    self._level[kind] + elapsed * rate)

    def reserve(self, requests: float = 1.0, tokens: float = 0.0) -> float:
        """Takes `requests` and `tokens` from the bucket; returns seconds to wait."""
        with self._lock:
            now = self._clock()
            self._refill(now)
            wait = 0.0
            for kind, amount in (("requests", requests), ("tokens", tokens)):
                if kind in self._rates and amount:
                    self._level[kind] -= amount
                    if self._level[kind] < 0:
                        wait = max(wait, -self._level[kind] / self._rates[kind])
            return wait

    def charge_tokens(self, tokens: float) -> None:
        """Adds tokens learnt after the call (the completion) as debt, so later
        requests wait for them."""
        if "tokens" in self._rates and tokens:
            with self._lock:
                self._refill(self._clock())
                self._level["tokens"] -= tokens


@dataclasses.dataclass(frozen=True)
class QuotaConfig:
    """A job-wide quota for one model endpoint, and how to share it."""

    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    num_vms: int = 1
    # Identifies the job, so buckets of different runs on one machine never mix.
    run_id: str = "local"
    burst_seconds: float = 1.0
    envoy_address: Optional[str] = None
    envoy_domain: str = "codeclm"

    @property
    def enabled(self) -> bool:
        return bool(self.envoy_address or self.requests_per_minute
                    or self.tokens_per_minute)

    def per_vm(self, per_minute: Optional[float]) -> Optional[float]:
        return per_minute / max(1, self.num_vms) if per_minute else None


class TokenBucketRateLimiter(RateLimiter):
    """A Beam `RateLimiter` over a per-VM `TokenBucket`.

    `allow` blocks until the reservation is due and always returns True. The wait is
    measured by the caller, which signals it to Dataflow from the bundle thread (Beam
    metrics updated from helper threads are dropped).
    """

    def __init__(self, quota: QuotaConfig, tag: str, namespace: str = "codeclm"):
        super().__init__(namespace=namespace)
        self._quota = quota
        # The tag is a file name for MultiProcessShared's lock and address files.
        # A model identity can be long (a GGUF path): name the files by its hash.
        model_hash = hashlib.sha256(tag.encode("utf-8")).hexdigest()[:16]
        self._tag = re.sub(r"[^A-Za-z0-9_.-]", "_",
                           f"codeclm-quota-{quota.run_id}-{model_hash}")
        self._bucket = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_bucket"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shared_bucket(self):
        if self._bucket is None:
            with self._lock:
                if self._bucket is None:
                    quota = self._quota
                    self._bucket = MultiProcessShared(
                        lambda: TokenBucket(quota.per_vm(quota.requests_per_minute),
                                            quota.per_vm(quota.tokens_per_minute),
                                            quota.burst_seconds),
                        tag=self._tag, always_proxy=True).acquire()
        return self._bucket

    def allow(self, hits_added: int = 1, tokens: int = 0) -> bool:
        wait = self._shared_bucket().reserve(hits_added, tokens)
        if wait > 0:
            time.sleep(wait)
        return True

    def charge_tokens(self, tokens: int) -> None:
        self._shared_bucket().charge_tokens(tokens)


def make_rate_limiter(quota: QuotaConfig, tag: str) -> Optional[RateLimiter]:
    """The limiter a quota asks for: Envoy for a truly global limit, else the per-VM
    token bucket, else none."""
    if quota.envoy_address:
        return EnvoyRateLimiter(
            service_address=quota.envoy_address,
            domain=quota.envoy_domain,
            descriptors=[{"model": tag}],
            namespace="codeclm")
    if quota.requests_per_minute or quota.tokens_per_minute:
        return TokenBucketRateLimiter(quota, tag)
    return None
