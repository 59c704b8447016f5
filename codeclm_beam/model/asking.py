"""One element's way to a usable answer, apart from whatever carries its requests.

`AnswerValidator` says whether an answer can be used; `Asking` decides what to send
next (a re-send with more room for a cut answer, a re-ask with another seed for an
unusable one) and what the element's result is. Both are pure: they send nothing,
cache nothing and count nothing outside themselves, so the online client
(`client.ModelClient`) and the batch jobs (`batch._RunJobs`) drive the same rules.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Optional

import jsonschema

from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import ModelError
from codeclm_beam.model.errors import SchemaMismatch
from codeclm_beam.model.errors import TruncatedAnswer
from codeclm_beam.model.errors import failure_reason
from codeclm_beam.model.thinking import output_token_limit
from codeclm_beam.model.types import CallStats
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.model.types import ModelResult
from codeclm_beam.model.types import Usage
from codeclm_beam.records import invalid_text_reason
from codeclm_beam.redact import excerpt

_LOG = logging.getLogger(__name__)

# An answer longer than this many characters per requested output token is not a
# model answer but a misbehaving server (or an injection attempt); never parse it.
_MAX_CHARS_PER_TOKEN = 16
# Seeds for re-asks after a schema failure, so a re-run re-asks identically.
_REASK_SEED_STRIDE = 7919

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
            # "\u0000" or "\ud800" in a JSON string: valid JSON, text no record may
            # carry.
            invalid = next(filter(None, map(invalid_text_reason, _strings(data))), None)
            if invalid:
                raise SchemaMismatch(f"answer's JSON holds {invalid}", text)
        if self._check is not None:
            problem = self._check(text if data is None else data)
            if problem:
                raise SchemaMismatch(f"answer unusable: {problem}", text)
        return data

    def usable(self, request: ModelRequest, response: ModelResponse) -> bool:
        """Whether a stored answer passes the test a fresh one would."""
        try:
            self.validate(request, response.text, response.finish_reason)
        except SchemaMismatch as unusable:
            _LOG.warning("cached answer to %s is not used (asked again): %s",
                         request.request_id, unusable)
            return False
        return True

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


@dataclasses.dataclass(frozen=True)
class ReaskPolicy:
    """How often an element is asked again, and the output limit a request goes out
    with (its visible budget plus the model's thinking: `thinking.output_token_limit`)."""
    max_parse_retries: int
    max_truncation_retries: int
    backend: str
    model: str

    @classmethod
    def of(cls, config: ModelConfig) -> "ReaskPolicy":
        spec = config.spec
        return cls(config.max_parse_retries, config.max_truncation_retries,
                   spec.backend, spec.model)

    def wire_limit(self, request: ModelRequest) -> int:
        return output_token_limit(self.backend, self.model,
                                  request.settings.max_output_tokens,
                                  request.settings.thinking)


@dataclasses.dataclass
class Tally:
    """What one element's asking cost, whichever way its requests went."""
    attempts: int = 0
    retries: int = 0
    parse_retries: int = 0
    truncation_retries: int = 0
    throttled: float = 0.0
    usage: Usage = Usage()

    def stats(self, truncated: bool = False) -> CallStats:
        return CallStats(attempts=self.attempts, retries=self.retries,
                         parse_retries=self.parse_retries,
                         truncation_retries=self.truncation_retries,
                         throttled_seconds=self.throttled, truncated=truncated,
                         usage=self.usage)


class Asking:
    """One element's asking: the request; once per element, a re-send with the whole
    first limit added as room when an answer stopped at the limit; and up to
    `max_parse_retries` re-asks with another seed when an answer is unusable (cut,
    off-schema, empty). The caller sends `next_request`, hands the answer to `take`
    (or the transport's error to `fail`) until `next_request` is None, then reads
    `result()`."""

    def __init__(self, request: ModelRequest, policy: ReaskPolicy,
                 validator: AnswerValidator):
        self.request = request
        self.tally = Tally()
        self.next_request: Optional[ModelRequest] = request
        self._policy = policy
        self._validator = validator
        self._response: Optional[ModelResponse] = None
        self._error: Optional[BaseException] = None
        self._last: Optional[RawAnswer] = None
        self._reasks = 0

    def charge(self, raw: RawAnswer) -> None:
        """Counts one billed answer and its tokens."""
        self.tally.attempts += 1
        self.tally.usage += raw.usage

    def take(self, raw: RawAnswer) -> None:
        asked, policy = self.next_request, self._policy
        self._last = raw
        if raw.truncated and self.tally.truncation_retries < policy.max_truncation_retries:
            # Cut even with more room is a model looping on itself: then re-ask.
            self.tally.truncation_retries += 1
            self.next_request = asked.with_max_output_tokens(
                asked.settings.max_output_tokens + policy.wire_limit(asked))
            return
        try:
            if raw.truncated:
                raise self._truncated(raw)
            data = self._validator.validate(self.request, raw.text, raw.finish_reason)
        except (SchemaMismatch, TruncatedAnswer) as unusable:
            if self._reasks >= policy.max_parse_retries:
                self.fail(unusable)
                return
            self._reasks += 1
            self.tally.parse_retries += 1
            seed = self.request.settings.seed
            self.next_request = self.request.with_seed(
                None if seed is None else seed + _REASK_SEED_STRIDE * self._reasks)
            return
        self.next_request = None
        self._response = ModelResponse(text=raw.text, data=data,
                                       finish_reason=raw.finish_reason, usage=raw.usage)

    def fail(self, error: BaseException) -> None:
        self.next_request = None
        self._error = error

    def result(self) -> ModelResult:
        """The usable answer with what it cost, or why there is none."""
        assert self.next_request is None
        if self._response is not None:
            return dataclasses.replace(self._response, stats=self.tally.stats())
        error, last = self._error, self._last
        if not isinstance(error, ModelError):  # a bug or an unexpected library error
            _LOG.error("unexpected error asking %s: %r", self.request.request_id, error,
                       exc_info=error)
        raw = getattr(error, "raw_answer", None) or (last.text if last else None)
        return ModelFailure(
            request_id=self.request.request_id,
            error_class=type(error).__name__,
            message=excerpt(str(error)),
            attempts=self.tally.attempts,
            raw_answer=excerpt(raw) if raw else None,
            stats=self.tally.stats(truncated=isinstance(error, TruncatedAnswer)),
            reason=failure_reason(error),
            finish_reason=getattr(error, "finish_reason", None) or (
                last.finish_reason if last else None))

    def _truncated(self, raw: RawAnswer) -> TruncatedAnswer:
        # Says how many re-sends with more room were made: none with
        # --max_truncation_retries 0, which the demo runs with.
        re_sends = self.tally.truncation_retries
        return TruncatedAnswer(
            f"answer stopped at the output limit (finish reason {raw.finish_reason}; "
            f"limit {self._policy.wire_limit(self.request)} tokens for a visible budget "
            f"of {self.request.settings.max_output_tokens}, "
            f"{'no' if not re_sends else re_sends} re-send{'' if re_sends == 1 else 's'} "
            f"with more room; last answer: {raw.usage.completion_tokens} visible + "
            f"{raw.usage.thoughts_tokens} "
            "thought tokens): raise the stage's output budget or lower its thinking",
            raw.text, raw.finish_reason)


def _strings(data: Any):
    """Every string in parsed JSON, keys included."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from _strings(value)
    elif isinstance(data, list):
        for value in data:
            yield from _strings(value)
