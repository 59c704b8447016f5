"""The model layer's Beam face: a `RemoteModelHandler` for `RunInference`.

RunInference owns batching, per-process client sharing and its own metrics, as for any
Beam model. This handler owns what a paid chat API needs on top, per element:

    cache lookup -> quota -> send -> retry (transport) -> validate -> re-ask (schema)
                 -> cache store -> ModelResponse | ModelFailure

`request()` never raises. RemoteModelHandler's own retry and failure path work per
*batch* (one bad element would re-send or dead-letter 31 good ones), so every element
comes back as a `PredictionResult` whose inference is a response or a `ModelFailure`,
and the calling transform routes failures to its dead-letter output.

Elements of a batch run concurrently on a thread pool shared by every stage that calls
the same model in this process, so `max_concurrency` bounds requests in flight per
worker process and a batch of 32 costs about one round-trip, not 32.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jsonschema
import tenacity
from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RemoteModelHandler

from codeclm_beam import metrics
from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.backends import create_backend
from codeclm_beam.model.cache import ResponseCache
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import ErrorShareExceeded
from codeclm_beam.model.errors import ModelError
from codeclm_beam.model.errors import SERVICE_FAILURES
from codeclm_beam.model.errors import SchemaMismatch
from codeclm_beam.model.errors import TransientModelError
from codeclm_beam.model.errors import TruncatedAnswer
from codeclm_beam.model.errors import failure_reason
from codeclm_beam.model.ratelimit import TokenBucketRateLimiter
from codeclm_beam.model.ratelimit import make_rate_limiter
from codeclm_beam.model.thinking import output_token_limit
from codeclm_beam.model.types import CallStats
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.model.types import ModelResult
from codeclm_beam.model.types import Usage
from codeclm_beam.records import invalid_text_reason
from codeclm_beam.redact import redact

_LOG = logging.getLogger(__name__)

# An answer longer than this many characters per requested output token is not a
# model answer but a misbehaving server (or an injection attempt); never parse it.
_MAX_CHARS_PER_TOKEN = 16
# Seeds for re-asks after a schema failure, so a re-run re-asks identically.
_REASK_SEED_STRIDE = 7919

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


AnswerCheck = Callable[[Any], Optional[str]]


class AnswerValidator:
    """Whether an answer is usable: not cut, not empty, text that can be written, JSON
    of its schema, and (`check`, the stage's own rule, e.g. "a usable skill") fit for
    the stage. Fresh answers and cache hits pass the same test, so a cache entry
    written by another version, by hand or under another rule never serves an answer
    the stage would refuse; an unusable answer is re-asked, never cached."""

    def __init__(self, check: Optional[AnswerCheck] = None):
        self._check = check
        self._schemas: dict[str, Any] = {}

    def validate(self, request: ModelRequest, text: str, finish_reason: str) -> Any:
        """The answer's data (None for free text); raises SchemaMismatch."""
        invalid = invalid_text_reason(text)
        if invalid:
            # It could be neither cached nor written: ask again, as for a broken answer.
            raise SchemaMismatch(f"answer is {invalid}", text)
        limit = request.settings.max_output_tokens * _MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            raise SchemaMismatch(
                f"answer of {len(text)} characters exceeds {limit} "
                f"({request.settings.max_output_tokens} tokens)", text[:2000])
        if request.json_schema_text is None:
            if not text.strip():
                raise SchemaMismatch("empty answer", text)
            data = None
        else:
            data = self._schema_data(request, text, finish_reason)
        if self._check is not None:
            problem = self._check(text if data is None else data)
            if problem:
                raise SchemaMismatch(f"answer unusable: {problem}", text)
        return data

    def _schema_data(self, request: ModelRequest, text: str, finish_reason: str) -> Any:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SchemaMismatch(f"answer is not JSON ({e}; finish reason "
                                 f"{finish_reason})", text) from None
        validator = self._schemas.get(request.json_schema_text)
        if validator is None:
            schema = request.json_schema
            validator = jsonschema.validators.validator_for(schema)(schema)
            self._schemas[request.json_schema_text] = validator
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise SchemaMismatch(f"answer fails its schema at {path}: {error.message}",
                                 text)
        return data

    def cached(self, cache: Optional[ResponseCache], request: ModelRequest,
               key: str) -> Optional[ModelResponse]:
        """The cached answer to a request (by its cache key), as a cache hit, if it is
        usable."""
        if cache is None:
            return None
        hit = cache.get(key)
        if hit is None:
            return None
        try:
            self.validate(request, hit.text, hit.finish_reason)
        except SchemaMismatch as unusable:
            _LOG.warning("cached answer %s is not used (asked again): %s", key, unusable)
            return None
        return hit


class ErrorShareGuard:
    """Per worker process and model: the outcomes of its last WINDOW calls. When more
    than the model's `max_error_share` of them failed at the service (after their
    retries), the next one raises ErrorShareExceeded, which fails the bundle and so
    the run (NeMo Data Designer's early shutdown, with a sliding window so an outage
    late in a long run stops it as fast as one at its start). Every answer so far is
    in the cache: the same command resumes once the cause is fixed."""

    # Online calls only: a batch job's outcome is one event for many requests.
    WINDOW = 20
    # Outcomes seen before any stop: a few failures of a small stage are dead letters.
    MINIMUM = 10

    def __init__(self):
        self._lock = threading.Lock()
        self._outcomes: dict[str, collections.deque] = {}
        self.stopped: Optional[str] = None  # why this process stopped a run

    def record(self, config: ModelConfig, result: ModelResult) -> None:
        failed = isinstance(result, ModelFailure) and result.reason in SERVICE_FAILURES
        with self._lock:
            outcomes = self._outcomes.setdefault(
                config.identity, collections.deque(maxlen=self.WINDOW))
            outcomes.append(result if failed else None)
            failures = [r for r in outcomes if r is not None]
            if (config.max_error_share >= 1 or len(outcomes) < self.MINIMUM
                    or len(failures) <= config.max_error_share * len(outcomes)):
                return
            last = failures[-1]
            self.stopped = (
                f"{len(failures)} of the last {len(outcomes)} calls to "
                f"{redact(config.uri)} failed after their retries (last: {last.reason}, "
                f"{last.message[:200]}), over --max_error_share "
                f"{config.max_error_share:g}; every answer so far is cached: fix the "
                "cause and run the same command to resume")
            outcomes.clear()
        raise ErrorShareExceeded(self.stopped)

    def reset(self) -> None:
        with self._lock:
            self._outcomes.clear()
            self.stopped = None


ERROR_SHARE = ErrorShareGuard()


class ModelClient:
    """Everything one worker process needs to call one model."""

    def __init__(self, config: ModelConfig, backend: Optional[Backend] = None,
                 check: Optional[AnswerCheck] = None):
        self.config = config
        self.validator = AnswerValidator(check)
        self.spec = config.spec
        self.backend = backend or create_backend(config)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self.identity = config.identity
        self.limiter = make_rate_limiter(config.quota, tag=self.identity)
        workers = config.max_concurrency if self.backend.concurrent else 1
        self.pool = _shared_pool(self.identity, workers)

    def call_all(self, requests: Sequence[ModelRequest]) -> list[ModelResult]:
        if len(requests) == 1:
            return [self.call(requests[0])]
        return list(self.pool.map(self.call, requests))

    def call(self, request: ModelRequest) -> ModelResult:
        hit = self.validator.cached(self.cache, request,
                                    request.cache_key(self.identity))
        if hit is not None:
            return hit
        asking = Asking(self, request)
        try:
            while asking.next_request is not None:
                asking.take(self._send_with_retries(asking.next_request, asking.counters))
        except Exception as error:  # a transport error, after its retries
            asking.fail(error)
        result = self.finish(asking)
        ERROR_SHARE.record(self.config, result)  # online calls only: see its docstring
        return result

    def finish(self, asking: "Asking") -> ModelResult:
        """The result of a finished `Asking`: its response (then cached), or its
        failure."""
        assert asking.next_request is None
        if asking.response is not None:
            response = _with_stats(asking.response, _stats(asking.counters))
            if self.cache:
                self.cache.put(asking.request.cache_key(self.identity), response)
            return response
        error = asking.error
        if not isinstance(error, ModelError):  # a bug or an unexpected library error
            _LOG.error("unexpected error calling %s: %r", self.spec.uri, error,
                       exc_info=error)
        return self._failure(asking.request, error, asking.counters, asking.last_answer)

    def _truncated(self, request: ModelRequest, raw: RawAnswer) -> TruncatedAnswer:
        return TruncatedAnswer(
            f"answer stopped at the output limit (finish reason {raw.finish_reason}; "
            f"limit {self._wire_limit(request)} tokens for a visible budget of "
            f"{request.settings.max_output_tokens}, and one re-send with more room; "
            f"last answer: {raw.usage.completion_tokens} visible + "
            f"{raw.usage.thoughts_tokens} "
            "thought tokens): raise the stage's output budget or lower its thinking",
            raw.text, raw.finish_reason)

    def _wire_limit(self, request: ModelRequest) -> int:
        return output_token_limit(self.spec.backend, self.spec.model,
                                  request.settings.max_output_tokens,
                                  request.settings.thinking)

    def _send_with_retries(self, request: ModelRequest, counters: dict) -> RawAnswer:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            counters["retries"] += 1
            error = state.outcome.exception() if state.outcome else None
            metrics.LIVE.retried(redact(f"{self.spec.uri}: {error}")[:160])
        retrying = transport_retrying(self.config, before_sleep=before_sleep)
        return retrying(self._send_once, request, counters)

    def _send_once(self, request: ModelRequest, counters: dict) -> RawAnswer:
        estimate = _estimate_tokens(request)
        if self.limiter is not None:
            started = time.monotonic()
            if isinstance(self.limiter, TokenBucketRateLimiter):
                self.limiter.allow(hits_added=1, tokens=estimate)
            else:
                self.limiter.allow(hits_added=1)
            counters["throttled"] += time.monotonic() - started
        counters["attempts"] += 1
        raw = self.backend.generate(request)
        counters["usage"] += raw.usage
        if isinstance(self.limiter, TokenBucketRateLimiter):
            # Thoughts are output tokens to a quota, as they are to the bill.
            self.limiter.charge_tokens(raw.usage.billed - estimate)
        return raw

    def _failure(self, request, error, counters, last: Optional[RawAnswer]
                 ) -> ModelFailure:
        raw = getattr(error, "raw_answer", None) or (last.text if last else None)
        return ModelFailure(
            request_id=request.request_id,
            error_class=type(error).__name__,
            message=redact(str(error))[:4000],
            attempts=counters["attempts"],
            raw_answer=redact(raw)[:4000] if raw else None,
            stats=_stats(counters, truncated=isinstance(error, TruncatedAnswer)),
            reason=failure_reason(error),
            finish_reason=getattr(error, "finish_reason", None) or (
                last.finish_reason if last else None))


_COUNTED = ("attempts", "retries", "parse_retries", "truncation_retries")


def _new_counters() -> dict:
    return {**dict.fromkeys(_COUNTED, 0), "throttled": 0.0, "usage": Usage()}


def _stats(counters: dict, truncated: bool = False) -> CallStats:
    return CallStats(throttled_seconds=counters["throttled"], truncated=truncated,
                     usage=counters["usage"], **{name: counters[name] for name in _COUNTED})


def _with_stats(response: ModelResponse, stats: CallStats) -> ModelResponse:
    import dataclasses
    return dataclasses.replace(response, stats=stats)


class Asking:
    """One element's way to a usable answer, whatever carries its requests (online
    calls, or the lines of batch prediction jobs): the request; once per element, a
    re-send with the whole first limit added as room when an answer stopped at the
    limit; and up to `max_parse_retries` re-asks with another seed when an answer is
    unusable (cut, off-schema, empty). The caller sends `next_request` and hands the
    answer to `take` until `next_request` is None; `ModelClient.finish` then makes
    the result."""

    def __init__(self, client: ModelClient, request: ModelRequest):
        self.request = request
        self.counters = _new_counters()
        self.next_request: Optional[ModelRequest] = request
        self.response: Optional[ModelResponse] = None
        self.error: Optional[BaseException] = None
        self.last_answer: Optional[RawAnswer] = None
        self._client = client
        self._reasks = 0

    def take(self, raw: RawAnswer) -> None:
        client, asked = self._client, self.next_request
        self.last_answer = raw
        if raw.truncated and (self.counters["truncation_retries"]
                              < client.config.max_truncation_retries):
            # Cut even with more room is a model looping on itself: then re-ask.
            self.counters["truncation_retries"] += 1
            self.next_request = asked.with_max_output_tokens(
                asked.settings.max_output_tokens + client._wire_limit(asked))
            return
        try:
            if raw.truncated:
                raise client._truncated(self.request, raw)
            data = client.validator.validate(self.request, raw.text, raw.finish_reason)
        except (SchemaMismatch, TruncatedAnswer) as unusable:
            if self._reasks >= client.config.max_parse_retries:
                self.fail(unusable)
                return
            self._reasks += 1
            self.counters["parse_retries"] += 1
            seed = self.request.settings.seed
            self.next_request = self.request.with_seed(
                None if seed is None else seed + _REASK_SEED_STRIDE * self._reasks)
            return
        self.next_request = None
        self.response = ModelResponse(text=raw.text, data=data,
                                      finish_reason=raw.finish_reason, usage=raw.usage)

    def charge(self, raw: RawAnswer) -> None:
        """Counts an answer that came by another way than `_send_once` (a batch
        job's line): one billed attempt and its tokens."""
        self.counters["attempts"] += 1
        self.counters["usage"] += raw.usage

    def fail(self, error: BaseException) -> None:
        self.next_request = None
        self.error = error


class StageMetrics:
    """Beam counters for one stage and model. Updated only from the bundle thread:
    Beam drops metric updates made from helper threads."""

    def __init__(self, stage: str, model_id: str):
        namespace = metrics.model_namespace(stage, model_id)
        self._counters = {name: metrics.Counter(namespace, name)
                          for name in metrics.MODEL_COUNTERS}
        self._signaler = ThrottlingSignaler(namespace)
        self._throttled_carry = 0.0

    def record(self, results: Iterable[ModelResult], final: bool = True) -> None:
        """Counts results; `final=False` counts their requests and tokens only (an
        element whose answer is counted elsewhere)."""
        totals = dict.fromkeys(metrics.MODEL_COUNTERS, 0)
        throttled = 0.0
        for result in results:
            stats = result.stats
            totals["elements"] += int(final)
            totals["requests"] += stats.attempts
            totals["cache_hits"] += int(stats.cache_hit)
            totals["retries"] += stats.retries
            totals["parse_retries"] += stats.parse_retries
            totals["truncation_retries"] += stats.truncation_retries
            totals["truncated"] += int(final and stats.truncated)
            totals["failures"] += int(final and isinstance(result, ModelFailure))
            for kind, tokens in stats.usage.as_dict().items():
                totals[kind] += tokens
            if stats.paid_before is not None:
                for name, value in stats.paid_before.as_dict().items():
                    totals[metrics.PAID_BEFORE[name]] += value
            throttled += stats.throttled_seconds
        totals["throttled_ms"] = int(throttled * 1000)
        for name, value in totals.items():
            if value:
                self._counters[name].inc(value)
        self._signal_throttled(throttled)

    def job_started(self) -> None:
        """A batch prediction job is being submitted, or a previous one resumed."""
        self._counters["batch_jobs"].inc()

    def job_ended(self, failed: bool) -> None:
        self._counters["batch_jobs_ended"].inc()
        if failed:
            self._counters["batch_jobs_failed"].inc()

    def waited(self, seconds: float) -> None:
        """Time spent waiting for a batch job: throttled time to Dataflow's
        autoscaler (waiting is no reason to add workers)."""
        if seconds:
            self._counters["batch_wait_ms"].inc(int(seconds * 1000))
            self._signal_throttled(seconds)

    def _signal_throttled(self, seconds: float) -> None:
        # Dataflow's autoscaler reads whole seconds; carry the fraction forward.
        self._throttled_carry += seconds
        whole = math.floor(self._throttled_carry)
        if whole:
            self._signaler.signal_throttled(whole)
            self._throttled_carry -= whole


class CodecLMModelHandler(RemoteModelHandler[ModelRequest, PredictionResult, ModelClient]):
    """One model, as called by one stage. Use it with `RunInference`, usually keyed:
    `RunInference(KeyedModelHandler(CodecLMModelHandler(config, "encode")))`."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        # Batch-level retries and throttling stay off: the client retries per element
        # and never raises, and quota waits are signalled by StageMetrics.
        super().__init__(namespace=metrics.PREFIX + stage, num_retries=0)
        self._config = config
        self._stage = stage
        self._check = check
        # A batch is what runs concurrently; a few rounds of the pool per batch keep
        # it busy without holding many elements in memory. Batches start at the
        # pool's width: BatchElements otherwise starts at one element and grows with
        # its measured batch time, so against a slow server it spent most of a stage
        # at 2 elements in flight (1.65-2.3 on average, measured). A bundle's last
        # batch is flushed whatever its size, so a small stage never waits for more.
        self._batching_kwargs = {
            "min_batch_size": max(1, config.max_concurrency),
            "max_batch_size": max(1, config.max_concurrency * 4)}
        self._metrics: Optional[StageMetrics] = None

    @property
    def config(self) -> ModelConfig:
        return self._config

    def create_client(self) -> ModelClient:
        return ModelClient(self._config, check=self._check)

    def request(self, batch: Sequence[ModelRequest], model: ModelClient,
                inference_args: Optional[dict[str, Any]] = None) -> list[PredictionResult]:
        metrics.LIVE.flying(self._stage, len(batch))
        try:
            results = model.call_all(batch)
        finally:
            metrics.LIVE.flying(self._stage, -len(batch))
        if self._metrics is None:
            self._metrics = StageMetrics(self._stage, model.identity)
        self._metrics.record(results)
        return [PredictionResult(example=req, inference=res, model_id=model.spec.uri)
                for req, res in zip(batch, results)]

    def get_metrics_namespace(self) -> str:
        return metrics.PREFIX + self._stage

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_metrics"] = None
        return state
