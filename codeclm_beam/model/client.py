"""The online caller of one model: quota -> send -> retry (transport), per element,
with the element's re-asks decided by `asking.Asking`.

    ask(request):  Asking ──next request──> quota ─> backend ─(transient: retry)─┐
                     ^                                                           │
                     └────────────────────────── answer ─────────────────────────┘

`call` is `ask` through the response cache: what the online transport runs for each
element, on the model's pool, each answer stored the moment it arrives. Nothing here
raises for one element: every element ends as a `ModelResponse` or a `ModelFailure`.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Optional, Sequence

import tenacity

from codeclm_beam import metrics
from codeclm_beam.model.asking import AnswerCheck
from codeclm_beam.model.asking import AnswerValidator
from codeclm_beam.model.asking import Asking
from codeclm_beam.model.asking import ReaskPolicy
from codeclm_beam.model.asking import Tally
from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.backends import create_backend
from codeclm_beam.model.cache import AnswerCache
from codeclm_beam.model.concurrency import outcome_of
from codeclm_beam.model.concurrency import shared_limit
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import TransientModelError
from codeclm_beam.model.guard import ERROR_SHARE
from codeclm_beam.model.ratelimit import TokenBucketRateLimiter
from codeclm_beam.model.ratelimit import make_rate_limiter
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResult
from codeclm_beam.redact import redact

_POOLS: dict[tuple, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(model_id: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOLS_LOCK:
        key = (model_id, workers)
        if key not in _POOLS:
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="codeclm-model")
        return _POOLS[key]


def _estimate_tokens(request: ModelRequest) -> int:
    # About four characters a token for English; only used to pre-pay the token
    # quota, and corrected with the server's real count after the call.
    return max(1, request.prompt_chars() // 4)


class _WaitForServerOrBackoff(tenacity.wait.wait_base):
    """The server's Retry-After / RetryInfo delay when it sent one, else exponential
    backoff with full jitter."""

    def __init__(self, initial: float, maximum: float):
        self._backoff = tenacity.wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, TransientModelError) and error.retry_after is not None:
            return error.retry_after
        return self._backoff(retry_state)


def transport_retrying(config: ModelConfig, **hooks) -> tenacity.Retrying:
    """How a call to a model's service is retried: transient errors only, at most
    `max_retries` times, waiting as the server asks or with jittered backoff."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(config.max_retries + 1),
        wait=_WaitForServerOrBackoff(config.initial_backoff_s, config.max_backoff_s),
        retry=tenacity.retry_if_exception_type(TransientModelError), reraise=True,
        **hooks)


class ModelClient:
    """Everything one worker process needs to call one model online."""

    def __init__(self, config: ModelConfig, backend: Optional[Backend] = None,
                 check: Optional[AnswerCheck] = None):
        self.config = config
        self.spec = config.spec
        self.identity = config.identity
        self.backend = backend or create_backend(config)
        self.validator = AnswerValidator(check)
        self.policy = ReaskPolicy.of(config)
        self.cache = (AnswerCache(config.cache_dir, self.identity, self.validator)
                      if config.cache_dir else None)
        self.limiter = make_rate_limiter(config.quota, tag=self.identity)
        workers = config.max_concurrency if self.backend.concurrent else 1
        self.pool = _shared_pool(self.identity, workers)
        # The pool is as wide as the ceiling; this decides how much of it is used.
        self.in_flight = shared_limit(self.identity, workers, config.concurrency,
                                      quota_given=config.quota.enabled)

    def ask_all(self, requests: Sequence[ModelRequest]) -> list[ModelResult]:
        """Each request asked concurrently on the model's pool (the cache neither read
        nor filled)."""
        return self._each(self.ask, requests)

    def ask(self, request: ModelRequest, store: bool = False) -> ModelResult:
        """The element's result; with `store`, its answer is written to the response
        cache as soon as it is had, so a run killed a moment later does not pay for
        it again."""
        asking = Asking(request, self.policy, self.validator)
        try:
            while asking.next_request is not None:
                asking.take(self._send_with_retries(asking.next_request, asking.tally))
        except Exception as error:  # a transport error, after its retries
            asking.fail(error)
        result = asking.result()
        if store and self.cache:
            self.cache.store(request, result)
        ERROR_SHARE.record(self.config, result)  # online calls only: see its docstring
        return result

    def call_all(self, requests: Sequence[ModelRequest]) -> list[ModelResult]:
        return self._each(self.call, requests)

    def _each(self, call, requests: Sequence[ModelRequest]) -> list[ModelResult]:
        # One request runs on the caller's thread: no hop through the pool.
        if len(requests) == 1:
            return [call(requests[0])]
        return list(self.pool.map(call, requests))

    def call(self, request: ModelRequest) -> ModelResult:
        """`ask`, answered from the response cache when it can be, and stored there."""
        hit = self.cache.lookup(request) if self.cache else None
        return hit if hit is not None else self.ask(request, store=True)

    def _send_with_retries(self, request: ModelRequest, tally: Tally) -> RawAnswer:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            tally.retries += 1
            error = state.outcome.exception() if state.outcome else None
            metrics.LIVE.retried(redact(f"{self.spec.uri}: {error}")[:160])
        retrying = transport_retrying(self.config, before_sleep=before_sleep)
        return retrying(self._send_once, request, tally)

    def _send_once(self, request: ModelRequest, tally: Tally) -> RawAnswer:
        estimate = _estimate_tokens(request)
        # Waiting for a slot or for quota is throttled time: Dataflow's autoscaler
        # then does not add workers that would only wait too.
        started = time.monotonic()
        ticket = self.in_flight.acquire()
        error: Optional[BaseException] = None
        try:
            if isinstance(self.limiter, TokenBucketRateLimiter):
                self.limiter.allow(hits_added=1, tokens=estimate)
            elif self.limiter is not None:
                self.limiter.allow(hits_added=1)
            tally.throttled += time.monotonic() - started
            tally.attempts += 1  # a request sent, whatever comes back
            raw = self.backend.generate(request)
        except BaseException as e:
            error = e
            raise
        finally:
            self.in_flight.release(ticket, outcome_of(error))
        tally.usage += raw.usage
        if isinstance(self.limiter, TokenBucketRateLimiter):
            self.limiter.charge_tokens(
                raw.usage.quota_tokens(self.spec.backend) - estimate)
        return raw
