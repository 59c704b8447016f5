"""The embedded backend: llama-cpp-python in the worker process.

One model per process, shared by every stage and thread that names the same file
(each Beam stage gets its own handler, so without this registry a pipeline with a
dozen model stages would load a dozen copies). llama.cpp runs one generation at a
time per model, hence the lock and `concurrent = False`.
"""
from __future__ import annotations

import atexit
import os
import threading

from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.types import ModelRequest

_MODELS: dict[tuple, tuple[object, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()

# llama.cpp expands a string's length bounds into one grammar rule per character: a
# maxLength of a few hundred makes a grammar it cannot parse, and the process dies with
# a segmentation fault. Bounds are left out of the grammar; the handler still validates
# every answer against the full schema, and re-asks when one breaks them.
_UNSAFE_GRAMMAR_KEYS = frozenset({"minLength", "maxLength", "pattern", "format"})


def grammar_schema(schema):
    """The schema without the keywords llama.cpp's grammar compiler cannot take."""
    if isinstance(schema, dict):
        return {k: grammar_schema(v) for k, v in schema.items()
                if k not in _UNSAFE_GRAMMAR_KEYS}
    if isinstance(schema, list):
        return [grammar_schema(v) for v in schema]
    return schema


def _load(path: str, n_ctx: int, n_threads: int):
    key = (path, n_ctx, n_threads)
    with _MODELS_LOCK:
        if key not in _MODELS:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise PermanentModelError(
                    "llamacpp: models need llama-cpp-python: "
                    "pip install 'codeclm-beam[local]'") from None
            model = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads,
                          verbose=False)
            _MODELS[key] = (model, threading.Lock())
        return _MODELS[key]


@atexit.register
def _close_all():
    # Free models before interpreter teardown, when llama.cpp's finalisers can no
    # longer run cleanly.
    with _MODELS_LOCK:
        for model, _ in _MODELS.values():
            model.close()
        _MODELS.clear()


class LlamaCppBackend(Backend):
    concurrent = False

    def __init__(self, config: ModelConfig):
        path = config.spec.gguf_path()
        n_threads = config.n_threads or max(1, os.cpu_count() or 1)
        self._model, self._lock = _load(path, config.n_ctx, n_threads)

    def generate(self, request: ModelRequest) -> RawAnswer:
        kwargs = {}
        schema = request.json_schema
        if schema is not None:
            # llama.cpp compiles the schema to a grammar: the answer is valid JSON of
            # that shape by construction (unless cut off by max_tokens).
            kwargs["response_format"] = {"type": "json_object",
                                         "schema": grammar_schema(schema)}
        if request.settings.seed is not None:
            kwargs["seed"] = request.settings.seed
        with self._lock:
            try:
                out = self._model.create_chat_completion(
                    messages=[{"role": m.role, "content": m.content}
                              for m in request.messages],
                    temperature=request.settings.temperature,
                    max_tokens=request.settings.max_output_tokens,
                    **kwargs)
            except ValueError as e:  # e.g. the prompt exceeds the context window
                raise PermanentModelError(f"llama.cpp: {e}") from e
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return RawAnswer(
            text=choice["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason") or "stop")
