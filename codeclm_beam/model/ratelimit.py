"""Request and token quotas, as a Beam `RateLimiter`.

Beam ships one limiter (`EnvoyRateLimiter`, a global limit through an Envoy rate-limit
service) and counts elements, not tokens. Model quotas are requests *and* tokens per
minute, so this module adds a sliding-window quota over both (`MinuteQuota`).

How a job-wide limit is split (the rule the CLI documents):

    per-VM limit = job limit / number of VMs

where the number of VMs is `--max_num_workers` (else `--num_workers`, else 1; the
DirectRunner is one VM however many worker processes it runs). All SDK processes of a
VM share one quota through `MultiProcessShared`, so the split does not depend on how
many processes or threads Dataflow starts per VM. An autoscaled job that runs with fewer
VMs than `--max_num_workers` stays under quota but uses less of it; for a limit that
holds exactly whatever the worker count, use the Envoy option.

Why not `pyrate-limiter` or `aiolimiter`: the quota has to live in one process per VM
behind a `MultiProcessShared` proxy, so every call is a cross-process RPC. A reservation
(one call returns how long to wait; the caller sleeps locally) keeps that to one RPC per
request and never blocks the proxy server; neither library has that shape.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from typing import Optional

from apache_beam.io.components.rate_limiter import EnvoyRateLimiter
from apache_beam.io.components.rate_limiter import RateLimiter
from apache_beam.utils.multi_process_shared import MultiProcessShared

from codeclm_beam.model.errors import TransientModelError

_LOG = logging.getLogger(__name__)


class MinuteQuota:
    """Requests and tokens per minute, as reservations against a sliding 60-second
    window.

    `reserve` books what a request needs at the earliest moment at which no 60-second
    window holds more than the limit, and returns how many seconds the caller must wait
    before sending: concurrent callers are served in arrival order (every booking goes
    after the last one), and the wait is slept by the caller, never here.

    Why a window and not a token bucket: a bucket of capacity C that keeps every
    window within the limit L must refill at (L - C) / 60, so a large burst (a cold
    start not throttled) costs the same share of steady-state throughput, and a small
    one (the old 1 s of quota) spaces a cold start's first requests. A window gives
    both: a cold start goes out at once up to the minute's quota, and a long run
    sends L in every minute, which is the quota a provider counts.
    """

    def __init__(self, requests_per_minute: Optional[float],
                 tokens_per_minute: Optional[float], window_s: float = 60.0,
                 clock=time.monotonic):
        self._clock = clock
        # Providers count a minute; a shorter window (same rate) is for tests.
        self._window_s = float(window_s)
        self._lock = threading.Lock()
        self._limits: dict[str, float] = {}
        self._booked: dict[str, collections.deque] = {}  # kind -> (time, amount)
        self._in_window: dict[str, float] = {}
        for kind, per_minute in (("requests", requests_per_minute),
                                 ("tokens", tokens_per_minute)):
            if per_minute is not None and per_minute <= 0:
                raise ValueError(f"{kind} per minute must be positive")
            if per_minute:
                self._limits[kind] = float(per_minute) * self._window_s / 60.0
                self._booked[kind] = collections.deque()
                self._in_window[kind] = 0.0
        self._last = float("-inf")  # the latest booking, so bookings stay in order

    def _forget_before(self, kind: str, start: float) -> None:
        booked = self._booked[kind]
        while booked and booked[0][0] <= start:
            self._in_window[kind] -= booked.popleft()[1]

    def _earliest(self, kind: str, at: float, amount: float) -> float:
        """The earliest time from `at` at which `amount` more fits the window."""
        limit, booked = self._limits[kind], self._booked[kind]
        amount = min(amount, limit)  # larger than a whole minute: alone in its window
        self._forget_before(kind, at - self._window_s)
        while booked and self._in_window[kind] + amount > limit:
            # Wait until the oldest booking leaves the window (popped by hand: its
            # time plus and minus the window need not round back to itself).
            oldest, oldest_amount = booked.popleft()
            self._in_window[kind] -= oldest_amount
            # 1% past the window: a request is counted when it reaches the server,
            # which may be later for the old booking than for the new one.
            at = max(at, oldest + self._window_s * 1.01)
            self._forget_before(kind, at - self._window_s)
        return at

    def reserve(self, requests: float = 1.0, tokens: float = 0.0) -> float:
        """Books `requests` and `tokens`; returns seconds to wait before sending."""
        with self._lock:
            now = self._clock()
            at = max(now, self._last)
            wanted = {"requests": requests, "tokens": tokens}
            # A later time only lets more out of the window, so the kind checked
            # first still fits at the time the second one needs.
            for kind in self._limits:
                if wanted[kind]:
                    at = self._earliest(kind, at, wanted[kind])
            for kind in self._limits:
                if wanted[kind]:
                    self._booked[kind].append((at, wanted[kind]))
                    self._in_window[kind] += wanted[kind]
            self._last = at
            return at - now

    def charge_tokens(self, tokens: float) -> None:
        """Corrects the last booking by tokens learnt after the call (the completion,
        and the real prompt count against its estimate), so later requests wait for
        them."""
        if "tokens" not in self._limits or not tokens:
            return
        with self._lock:
            booked = self._booked["tokens"]
            if tokens > 0 or not booked:
                booked.append((max(self._clock(), self._last), max(tokens, 0.0)))
                self._in_window["tokens"] += max(tokens, 0.0)
            else:  # fewer than estimated: give the difference back
                at, amount = booked[-1]
                returned = min(amount, -tokens)
                booked[-1] = (at, amount - returned)
                self._in_window["tokens"] -= returned


@dataclasses.dataclass(frozen=True)
class QuotaConfig:
    """A job-wide quota for one model endpoint, and how to share it."""

    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    num_vms: int = 1
    # Identifies the job, so quotas of different runs on one machine never mix.
    run_id: str = "local"
    # The window the quota is counted over: a minute, as providers count it.
    window_s: float = 60.0
    envoy_address: Optional[str] = None
    envoy_domain: str = "codeclm"

    @property
    def enabled(self) -> bool:
        return bool(self.envoy_address or self.requests_per_minute
                    or self.tokens_per_minute)

    def per_vm(self, per_minute: Optional[float]) -> Optional[float]:
        return per_minute / max(1, self.num_vms) if per_minute else None


class _QuotaChannel:
    """This process's one line to a VM's shared `MinuteQuota`.

    `MultiProcessShared` proxies open one connection per calling thread, and its server
    accepts with a backlog of 16 and authenticates each connection in its one accept
    thread. Sixty-four pool threads connecting at once overflowed that backlog: Linux
    drops the handshake's last ACK, the client believes it is connected and waits for
    the challenge forever (seen as threads stuck in `answer_challenge`, and runs that
    never ended). Every call of this process therefore goes through one thread, so one
    connection; and a call not answered in `RPC_TIMEOUT_S` abandons that thread (its
    connection may never answer) and is tried again on a new one.
    """

    RPC_TIMEOUT_S = 20.0
    ATTEMPTS = 3

    def __init__(self, quota: "QuotaConfig", tag: str):
        self._shared = MultiProcessShared(
            functools.partial(MinuteQuota, quota.per_vm(quota.requests_per_minute),
                              quota.per_vm(quota.tokens_per_minute), quota.window_s),
            tag=tag, always_proxy=True)
        self._lock = threading.Lock()
        self._calls: Optional[queue.SimpleQueue] = None

    def _serve(self, calls: queue.SimpleQueue) -> None:
        shared_quota = None
        while True:
            future, method, args = calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if shared_quota is None:
                    shared_quota = self._shared.acquire()
                future.set_result(getattr(shared_quota, method)(*args))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

    def call(self, method: str, *args):
        for _ in range(self.ATTEMPTS):
            with self._lock:
                if self._calls is None:
                    self._calls = queue.SimpleQueue()
                    # A daemon thread: one stuck on a dead connection must not hold
                    # up the interpreter's exit.
                    threading.Thread(target=self._serve, args=(self._calls,),
                                     name="codeclm-quota", daemon=True).start()
                calls = self._calls
            future: concurrent.futures.Future = concurrent.futures.Future()
            calls.put((future, method, args))
            try:
                return future.result(timeout=self.RPC_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                with self._lock:
                    if self._calls is calls:
                        self._calls = None
                _LOG.warning("the shared quota did not answer in %.0f s; reconnecting",
                             self.RPC_TIMEOUT_S)
        raise TransientModelError(
            f"the shared quota of this VM did not answer {self.ATTEMPTS} times in "
            f"{self.RPC_TIMEOUT_S:.0f} s")


_CHANNELS: dict[str, _QuotaChannel] = {}
_CHANNELS_LOCK = threading.Lock()


def _channel(quota: "QuotaConfig", tag: str) -> _QuotaChannel:
    """One channel per model identity and process, whichever stage asks."""
    with _CHANNELS_LOCK:
        if tag not in _CHANNELS:
            _CHANNELS[tag] = _QuotaChannel(quota, tag)
        return _CHANNELS[tag]


class TokenBucketRateLimiter(RateLimiter):
    """A Beam `RateLimiter` over a per-VM `MinuteQuota`.

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
        self._tag = _shared_files_prefix(quota.run_id) + model_hash

    def allow(self, hits_added: int = 1, tokens: int = 0) -> bool:
        wait = _channel(self._quota, self._tag).call("reserve", hits_added, tokens)
        if wait > 0:
            time.sleep(wait)
        return True

    def charge_tokens(self, tokens: int) -> None:
        if self._quota.tokens_per_minute:  # else a round trip to the quota for nothing
            _channel(self._quota, self._tag).call("charge_tokens", tokens)


def _shared_files_prefix(run_id: str) -> str:
    """The start of the name of a run's MultiProcessShared lock and address files (a
    model's hash, hex, ends it): characters a file name cannot hold made `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"codeclm-quota-{run_id}-")


def remove_shared_files(run_id: str) -> None:
    """The address and lock files MultiProcessShared leaves in the temp folder for a
    run's quotas, once the run is over (on Dataflow they go with the worker VMs)."""
    prefix = _shared_files_prefix(run_id)
    for path in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(prefix) + "*")):
        with contextlib.suppress(OSError):
            os.remove(path)


def make_rate_limiter(quota: QuotaConfig, tag: str) -> Optional[RateLimiter]:
    """The limiter a quota asks for: Envoy for a truly global limit, else the per-VM
    sliding-window quota, else none."""
    if quota.envoy_address:
        return EnvoyRateLimiter(
            service_address=quota.envoy_address,
            domain=quota.envoy_domain,
            descriptors=[{"model": tag}],
            namespace="codeclm")
    if quota.requests_per_minute or quota.tokens_per_minute:
        return TokenBucketRateLimiter(quota, tag)
    return None
