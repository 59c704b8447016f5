"""The response cache: an answered request is never paid for twice.

Beam keeps nothing between runs (its only request cache is `RequestResponseIO` with
Redis), so answers are stored as one small JSON object per request under `--cache_dir`
through Beam `FileSystems`, which makes `gs://` work on Dataflow and a local folder work
on the DirectRunner. One object per answer is what makes a killed run resumable: every
answer is durable the moment it is written, with no index to corrupt.

Keys are `ModelRequest.cache_key` (backend, model, messages, settings, schema), so a
re-run only hits when prompts are byte-identical: stages derive sampling seeds from
the run's `--seed` and the element's id for exactly that reason.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.asking import AnswerValidator
from codeclm_beam.model.types import PAID_FIELDS
from codeclm_beam.model.types import TOKEN_KINDS
from codeclm_beam.model.types import CallStats
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.model.types import ModelResult
from codeclm_beam.model.types import Paid
from codeclm_beam.model.types import Usage

_LOG = logging.getLogger(__name__)
_FORMAT_VERSION = 2


class ResponseCache:
    def __init__(self, root: str):
        self._root = root.rstrip("/")

    def _path(self, key: str) -> str:
        # Two levels of fan-out keep local directories and GCS listings small.
        return FileSystems.join(self._root, key[:2], key[2:4], key + ".json")

    def get(self, key: str) -> Optional[ModelResponse]:
        """The stored answer, or None: missing, half-written by a killed run, or not an
        entry this version wrote (each such entry is named in a warning and asked
        again, never a crash of the run)."""
        path = self._path(key)
        try:
            with FileSystems.open(path) as f:
                body = f.read()
        except Exception:  # missing
            return None
        try:
            return _response_from(json.loads(body.decode("utf-8")), key)
        except Exception as unusable:  # half-written, or written by hand or elsewhere
            _LOG.warning("response cache entry %s is unusable (asked again): %s",
                         path, unusable)
            return None

    def put(self, key: str, response: ModelResponse) -> None:
        """Stores an answer with what it was paid with (`response.stats`: every
        attempt's requests and tokens), so a later run that reads it can still say
        what the answer cost."""
        entry = {
            "version": _FORMAT_VERSION,
            "key": key,
            "text": response.text,
            "data": response.data,
            "finish_reason": response.finish_reason,
            **response.usage.as_dict(),
            "paid": Paid(response.stats.attempts, response.stats.usage).as_dict(),
        }
        body = json.dumps(entry, ensure_ascii=False).encode("utf-8")
        try:
            with FileSystems.create(self._path(key), mime_type="application/json") as f:
                f.write(body)
        except Exception as e:  # a cache that cannot be written costs money, not data
            _LOG.warning("could not write response cache entry %s: %s", key, e)


class AnswerCache:
    """The response cache of one model, as every transport reads and fills it: a hit
    is served only if it passes the stage's validator, and only fresh usable answers
    are stored (by `ModelRequest.cache_key` under the model's identity)."""

    def __init__(self, root: str, identity: str, validator: AnswerValidator):
        self._entries = ResponseCache(root)
        self._identity = identity
        self._validator = validator

    def key(self, request: ModelRequest) -> str:
        return request.cache_key(self._identity)

    def lookup(self, request: ModelRequest) -> Optional[ModelResponse]:
        hit = self._entries.get(self.key(request))
        if hit is None or not self._validator.usable(request, hit):
            return None
        return hit

    def store(self, request: ModelRequest, result: ModelResult) -> None:
        if isinstance(result, ModelResponse) and not result.stats.cache_hit:
            self._entries.put(self.key(request), result)


_ENTRY_FIELDS = {"text": str, "finish_reason": str,
                 **{kind: int for kind in TOKEN_KINDS}}


def _response_from(entry, key: str) -> Optional[ModelResponse]:
    """An entry checked field by field: the one test every read goes through."""
    if not isinstance(entry, dict):
        raise ValueError(f"not a JSON object but {type(entry).__name__}")
    if entry.get("version") != _FORMAT_VERSION:
        return None  # another format version: a plain miss
    if entry.get("key") != key:
        raise ValueError("it holds another request's key")
    for name, kind in _ENTRY_FIELDS.items():
        _check(entry.get(name), kind, name)
    usage = Usage.from_dict(entry)
    return ModelResponse(text=entry["text"], data=entry.get("data"),
                         finish_reason=entry["finish_reason"], usage=usage,
                         stats=CallStats(cache_hit=True, paid_before=_paid(entry, usage)))


def _check(value, kind: type, name: str) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or (
            kind is int and value < 0):
        raise ValueError(f"field {name!r} is {value!r}")


def _paid(entry: dict, usage: Usage) -> Paid:
    """What the stored answer was paid with. Entries written before this was stored
    count one request at the answer's own tokens: the least it can have cost."""
    paid = entry.get("paid")
    if paid is None:
        return Paid(1, usage)
    if not isinstance(paid, dict):
        raise ValueError(f"field 'paid' is {paid!r}")
    for name in PAID_FIELDS:
        _check(paid.get(name), int, f"paid.{name}")
    return Paid.from_dict(paid)
