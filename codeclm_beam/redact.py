"""Keeps keys and tokens out of logs, outputs, manifests and dead letters.

Every error message that leaves the model layer passes through `redact`, because
servers echo requests back in errors and client libraries put headers in messages.
"""
from __future__ import annotations

import os
import re

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = (
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "CODECLM_VERTEX_ACCESS_TOKEN",
)

_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)((?:api[_-]?key|x-goog-api-key|access_token|authorization)"
               r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]{6,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"),
    re.compile(r"\bya29\.[0-9A-Za-z_.-]{10,}"),
)

REDACTED = "[REDACTED]"


def redact(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    if not text:
        return text
    secrets = [os.environ.get(name, "") for name in SECRET_ENV_VARS] + list(extra_secrets)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


def strip_userinfo(url: str) -> str:
    """`https://user:pw@host/x` -> `https://host/x`, for model URIs shown in outputs."""
    return re.sub(r"//[^/@]*@", "//", url)
