"""Keeps keys and tokens out of logs, outputs, manifests and dead letters.

Every error message that leaves the model layer passes through `redact`, because
servers echo requests back in errors and client libraries put headers in messages.
It takes out: the values of the key variables below and of every credential a model
URI carried (`register_url_secrets`: a password, its Basic-auth encoding, a `?key=`
value, or any query value but a few known to be public), the credentials of any URL in the text (`public_url`), the credentials of an
`Authorization` header of any scheme and of `x-goog-api-key`, and tokens of the
shapes the providers use.
"""
from __future__ import annotations

import base64
import functools
import os
import re
import threading
import urllib.parse
from typing import Optional

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = (
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "CODECLM_VERTEX_ACCESS_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)

_PATTERNS = (
    # An Authorization header of any scheme (Bearer, Basic, Digest, ...): the scheme
    # stays, the credentials go.
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:[A-Za-z-]+\s+)?)"
               r"[^\s\"',}]{4,}"),
    re.compile(r"(?i)((?:bearer|basic|digest)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)((?:api[_-]?key|x-goog-api-key|access_token)"
               r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]{6,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"),
    re.compile(r"\bya29\.[0-9A-Za-z_.-]{10,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face access tokens
)

REDACTED = "[REDACTED]"
# Any URL in a text, up to white space or quoting.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")

# Credentials seen in model URIs in this process.
_URL_SECRETS: set[str] = set()
_URL_SECRETS_LOCK = threading.Lock()


def register_url_secrets(url: Optional[str]) -> None:
    """Remembers the credentials a URL carries, so `redact` takes them out of any text
    (a server that echoes its request, a client that prints its URL)."""
    if not url or "://" not in url:
        return
    authority = url.partition("://")[2]
    for mark in "/?#":
        authority = authority.split(mark, 1)[0]
    found = []
    userinfo = authority.rpartition("@")[0]
    if userinfo:
        user, _, password = userinfo.partition(":")
        found += [userinfo, password, urllib.parse.unquote(password),
                  base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()]
    query = url.partition("?")[2].partition("#")[0]
    # Decoded: `redact` matches every encoding of a secret (see `_any_encoding`).
    found += [v for k, v in urllib.parse.parse_qsl(query) if _is_credential_param(k)]
    with _URL_SECRETS_LOCK:
        _URL_SECRETS.update(s for s in found if s and len(s) >= 4)


def redact(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    if not text:
        return text
    with _URL_SECRETS_LOCK:
        url_secrets = sorted(_URL_SECRETS, key=len, reverse=True)
    secrets = ([os.environ.get(name, "") for name in SECRET_ENV_VARS]
               + list(extra_secrets) + url_secrets)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = _any_encoding(secret).sub(REDACTED, text)
    text = _URL.sub(lambda m: public_url(m.group(0)), text)
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=256)
def _any_encoding(secret: str) -> re.Pattern:
    """The secret as it may appear once a server or a library has quoted it: each
    character as itself or percent-encoded (upper or lower hex, one UTF-8 byte at a
    time), a space also as '+', in any mixture ("AbC+dEf%2FGhI%3d..." as echoed by a
    server that quotes only some characters)."""
    parts = []
    for char in secret:
        forms = ["".join(f"%(?i:{b:02x})" for b in char.encode("utf-8"))]
        forms.append(re.escape(char))
        if char == " ":
            forms.append(r"\+")
        parts.append("(?:" + "|".join(forms) + ")")
    return re.compile("".join(parts))


# How much of an error message or a failed answer a dead letter keeps: enough to see
# what went wrong, not a whole runaway answer per element.
EXCERPT_CHARS = 4000


def excerpt(text: str) -> str:
    """`text` redacted and cut to EXCERPT_CHARS, as every failure record holds it."""
    return redact(text)[:EXCERPT_CHARS]


# Query parameters known to carry no credential. Every other parameter's value is
# treated as a credential: services name theirs freely (`?key=`, `?code=` of Azure
# Functions, `?subscription-key=`, `?X-Amz-Signature=`, ...), so a list of the secret
# names is always one short, and a redacted harmless value costs nothing.
_PUBLIC_PARAMS = frozenset({"api-version", "api_version", "alt", "version", "format",
                            "region", "location", "deployment", "model"})


def _is_credential_param(name: str) -> bool:
    return name.lower() not in _PUBLIC_PARAMS


def public_url(url: Optional[str]) -> Optional[str]:
    """A URL as it may be recorded, printed or logged: no userinfo (`user:pw@`, also
    when the password holds an '@'), every query value redacted but those of the
    parameters known to be public (`_PUBLIC_PARAMS`)."""
    if not url:
        return url
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
            f"{REDACTED if _is_credential_param(k) else urllib.parse.quote(v, safe='')}"
            for k, v in pairs) + (hash_sign + fragment)
    return f"{scheme}://{authority}{path}{qmark}{query}"
