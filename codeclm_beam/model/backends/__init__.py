"""Backends: the only code that knows a wire protocol.

A backend sends one `ModelRequest` and returns a `RawAnswer`, or raises a
`TransientModelError` / `PermanentModelError`. Retries, quotas, caching, schema
validation and concurrency are the handler's, once for every backend.
"""
from __future__ import annotations

import abc
import logging
import threading
import dataclasses

from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import Usage


# httpx logs every request at INFO ("HTTP Request: POST ... 200 OK"): under a runner
# that logs at INFO (Beam YAML's entry point does) that is one line per model call.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Finish reasons that mean "stopped at the output limit" (Gemini; OpenAI and llama.cpp).
TRUNCATED_FINISH_REASONS = frozenset({"MAX_TOKENS", "LENGTH"})


@dataclasses.dataclass(frozen=True)
class RawAnswer:
    text: str
    finish_reason: str
    # Visible output apart from thought (reasoning) tokens, as Gemini's
    # `candidatesTokenCount` counts it (OpenAI's completion_tokens includes them: the
    # backend subtracts); cached prompt tokens are those served from context cache.
    usage: Usage = Usage()

    @property
    def truncated(self) -> bool:
        return str(self.finish_reason).upper() in TRUNCATED_FINISH_REASONS


class Backend(abc.ABC):
    # False where one process can only run one generation at a time (llama.cpp).
    concurrent: bool = True

    @abc.abstractmethod
    def generate(self, request: ModelRequest) -> RawAnswer:
        ...

    def check_model(self, timeout_s: float) -> None:
        """Asks the service once, before any stage runs, whether this model can be
        called: raises `ModelUnusable` saying why (unreachable, unauthorised,
        unknown model). Backends that fail at once where they start need none."""

    def close(self) -> None:
        pass


class ModelUnusable(Exception):
    """What `Backend.check_model` found, in words for the user."""


_SHARED: dict[tuple, Backend] = {}
_SHARED_LOCK = threading.Lock()


def create_backend(config: ModelConfig) -> Backend:
    """The backend of a model config. HTTP backends are shared by every stage of a
    worker process that calls the same model with the same settings: their clients
    are thread-safe, and building one per stage cost about 50 ms each at start-up
    (eighteen stages, measured)."""
    if config.spec.backend in ("vertex", "gemini", "openai"):
        key = (config, id(config.credentials))
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = _new_backend(config)
            return _SHARED[key]
    return _new_backend(config)


def _new_backend(config: ModelConfig) -> Backend:
    backend = config.spec.backend
    if backend in ("vertex", "gemini"):
        from codeclm_beam.model.backends.google import GoogleGenAIBackend
        return GoogleGenAIBackend(config)
    if backend == "openai":
        from codeclm_beam.model.backends.openai_compat import OpenAICompatibleBackend
        return OpenAICompatibleBackend(config)
    if backend == "llamacpp":
        from codeclm_beam.model.backends.llamacpp import LlamaCppBackend
        return LlamaCppBackend(config)
    if backend == "custom":
        import importlib
        module_name, _, class_name = config.spec.model.partition(":")
        backend_class = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
            raise TypeError(f"{config.uri}: {class_name} is not a Backend subclass")
        return backend_class(config)
    raise ValueError(f"no backend for {config.uri}")
