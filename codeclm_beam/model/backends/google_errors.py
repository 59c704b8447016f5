"""google-genai's errors as the model layer's, for online calls (`google.py`) and the
batch jobs API (`vertex_batch.py`) alike."""
from __future__ import annotations

from typing import Any, Optional

from codeclm_beam.model.errors import TransientModelError
from codeclm_beam.model.errors import classify_http_status
from codeclm_beam.model.errors import parse_retry_after


def translate_error(error: Exception) -> Exception:
    from google.genai import errors as genai_errors

    if isinstance(error, genai_errors.APIError):
        retry_after = _retry_after(error)
        return classify_http_status(
            int(error.code or 0), f"{error.code} {error.status}: {error.message}",
            retry_after)
    # Timeouts, dropped connections and unreadable bodies: worth sending again.
    return TransientModelError(f"{type(error).__name__}: {error}")


def _retry_after(error: Any) -> Optional[float]:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        seconds = parse_retry_after(headers.get("retry-after"))
        if seconds is not None:
            return seconds
    # google.rpc.RetryInfo in the error body: {"error": {"details": [{"retryDelay": ..}]}}
    body = getattr(error, "details", None) or {}
    details = body.get("error", {}).get("details", []) if isinstance(body, dict) else []
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and "retryDelay" in detail:
            return parse_retry_after(str(detail["retryDelay"]))
    return None
