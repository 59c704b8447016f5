"""Keeps keys and tokens out of logs, outputs, manifests and dead letters.

Every error message that leaves the model layer passes through `redact`, because
servers echo requests back in errors and client libraries put headers in messages.
"""
from __future__ import annotations

import os
import re
from typing import Optional

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


# Query parameters that carry credentials (`?key=`, `?api_key=`, `?token=`, ...).
_CREDENTIAL_PARAM = re.compile(
    r"(?i)^(key|api[_-]?key|apikey|token|access[_-]?token|auth|password|passwd|pwd|"
    r"secret|signature|sig|x-goog-api-key|client[_-]?secret)$")


def public_url(url: Optional[str]) -> Optional[str]:
    """A URL as it may be recorded, printed or logged: no userinfo (`user:pw@`, also
    when the password holds an '@'), credential-like query parameters redacted."""
    if not url:
        return url
    import urllib.parse
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority_end = len(rest)
    for mark in "/?#":
        index = rest.find(mark)
        if index != -1:
            authority_end = min(authority_end, index)
    authority, tail = rest[:authority_end], rest[authority_end:]
    # The host follows the last '@' of the authority: a password may contain '@'.
    authority = authority.rpartition("@")[2]
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_sign, fragment = query.partition("#")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{urllib.parse.quote(k, safe='')}="
            f"{REDACTED if _CREDENTIAL_PARAM.match(k) else urllib.parse.quote(v, safe='')}"
            for k, v in pairs) + (hash_sign + fragment)
    return f"{scheme}://{authority}{path}{qmark}{query}"
