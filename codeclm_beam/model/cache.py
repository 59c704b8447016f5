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

from codeclm_beam.model.types import ModelResponse

_LOG = logging.getLogger(__name__)
_FORMAT_VERSION = 2


class ResponseCache:
    def __init__(self, root: str):
        self._root = root.rstrip("/")

    def _path(self, key: str) -> str:
        # Two levels of fan-out keep local directories and GCS listings small.
        return FileSystems.join(self._root, key[:2], key[2:4], key + ".json")

    def get(self, key: str) -> Optional[ModelResponse]:
        path = self._path(key)
        try:
            with FileSystems.open(path) as f:
                entry = json.loads(f.read().decode("utf-8"))
        except Exception:  # missing, or half-written by a killed run: a miss
            return None
        if entry.get("version") != _FORMAT_VERSION or entry.get("key") != key:
            return None
        return ModelResponse(
            text=entry["text"], data=entry["data"],
            prompt_tokens=entry["prompt_tokens"],
            completion_tokens=entry["completion_tokens"],
            finish_reason=entry["finish_reason"],
            cached_prompt_tokens=entry["cached_prompt_tokens"],
            thoughts_tokens=entry["thoughts_tokens"])

    def put(self, key: str, response: ModelResponse) -> None:
        entry = {
            "version": _FORMAT_VERSION,
            "key": key,
            "text": response.text,
            "data": response.data,
            "prompt_tokens": response.prompt_tokens,
            "completion_tokens": response.completion_tokens,
            "finish_reason": response.finish_reason,
            "cached_prompt_tokens": response.cached_prompt_tokens,
            "thoughts_tokens": response.thoughts_tokens,
        }
        body = json.dumps(entry, ensure_ascii=False).encode("utf-8")
        try:
            with FileSystems.create(self._path(key), mime_type="application/json") as f:
                f.write(body)
        except Exception as e:  # a cache that cannot be written costs money, not data
            _LOG.warning("could not write response cache entry %s: %s", key, e)
