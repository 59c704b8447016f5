"""How a backend tells the model layer what went wrong.

Backends translate their client library's exceptions into these two classes, so the
retry policy is written once: `TransientModelError` is retried with backoff (honouring
the server's delay when it gives one), `PermanentModelError` goes straight to the dead
letter. `SchemaMismatch` is an answer that arrived but does not satisfy its schema; it
is re-asked, not retried.
"""
from __future__ import annotations

from typing import Optional

# The HTTP statuses a call may succeed on if sent again.
RETRYABLE_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ConfigurationError(ValueError):
    """A setting refused when the pipeline is built, before any model call; the CLI
    prints its message (no traceback) and exits with status 2."""


class ModelError(Exception):
    def __init__(self, message: str, *, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class TransientModelError(ModelError):
    def __init__(self, message: str, *, status: Optional[int] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentModelError(ModelError):
    pass


class SchemaMismatch(ModelError):
    def __init__(self, message: str, raw_answer: str):
        super().__init__(message)
        self.raw_answer = raw_answer


class TruncatedAnswer(ModelError):
    """An answer that stopped at the output limit (`MAX_TOKENS`, OpenAI `length`) even
    after the one re-send with a larger limit: never kept as if it were complete."""

    def __init__(self, message: str, raw_answer: str, finish_reason: str):
        super().__init__(message)
        self.raw_answer = raw_answer
        self.finish_reason = finish_reason


class BatchTimeout(ModelError):
    """The request's batch prediction job was cancelled at --batch_timeout before it
    answered the request."""


class BatchJobFailed(PermanentModelError):
    """The request's batch prediction job failed, or left no readable answer for it:
    apart from a refusal of the request itself, since a new job may well answer it."""


def failure_reason(error: BaseException) -> str:
    """The one-word reason a dead letter carries, so they can be counted and filtered."""
    if isinstance(error, TruncatedAnswer):
        return "truncated"
    if isinstance(error, SchemaMismatch):
        return "schema"
    if isinstance(error, TransientModelError):
        return "transient"
    if isinstance(error, BatchTimeout):
        return "timeout"
    if isinstance(error, BatchJobFailed):
        return "batch_failed"
    if isinstance(error, PermanentModelError):
        return "refused"
    return "error"


def classify_http_status(status: int, message: str,
                         retry_after: Optional[float] = None) -> ModelError:
    if status in RETRYABLE_HTTP_STATUSES:
        return TransientModelError(message, status=status, retry_after=retry_after)
    return PermanentModelError(message, status=status)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a `Retry-After` header (delta-seconds form) or a google.rpc
    RetryInfo `retryDelay` ("1.5s")."""
    if not value:
        return None
    value = value.strip()
    if value.endswith("s"):
        value = value[:-1]
    try:
        seconds = float(value)
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
    return max(0.0, seconds)


class ErrorShareExceeded(Exception):
    """Most recent calls to one model failed: the run stops instead of paying for
    retries and dead letters (`guard.ErrorShareGuard`)."""


# Failure reasons of an online call that say the service could not answer (not what a
# model answered, nor a batch job's fate, which is one event for many requests).
SERVICE_FAILURES = frozenset({"transient", "refused", "error"})
