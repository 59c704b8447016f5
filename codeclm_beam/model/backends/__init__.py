"""Backends: the only code that knows a wire protocol.

A backend sends one `ModelRequest` and returns a `RawAnswer`, or raises a
`TransientModelError` / `PermanentModelError`; one with a batch API also offers it as
`BatchJobs` (submit, follow, cancel, retrieve). Retries, quotas, caching, schema
validation, concurrency and the waves of batch jobs are the model layer's, once for
every backend.
"""
from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Optional, Union

from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import ModelError
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import Usage


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

    def batch_jobs(self) -> Optional["BatchJobs"]:
        """This service's batch API, or None where it has none."""
        return None

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """A batch job as the model layer follows it, whatever the provider."""
    name: str
    state: str  # the provider's own word, as its console and logs show it
    # Lowercase and provider-neutral: pending, running, succeeded, failed, ...
    phase: str
    finished: bool
    # False for a job that ended without answers to read (failed, cancelled, expired):
    # a re-run submits its requests anew.
    answered: bool
    age_s: float
    error: Optional[str] = None
    output: Optional[str] = None  # where a finished job wrote its answers

    def ended(self) -> str:
        """How it ended, for every failure it causes."""
        return f"batch job {self.name} ended {self.state}" + (
            f": {self.error}" if self.error else "")


@dataclasses.dataclass
class BatchAnswers:
    """What a finished job answered, per request label: the answer, or the request's
    own error; lines that could not be read at all are only counted."""
    answers: dict[str, Union[RawAnswer, ModelError]]
    unreadable: int = 0


class BatchJobs(abc.ABC):
    """A provider's batch API, in the shape of curator's `submit_batch` /
    `retrieve_batch`. Requests go in and come back under labels the caller chooses;
    every method raises `ModelError`s as `generate` does. Waves, re-asks, records,
    polling and time-outs are `model.batch`'s."""

    @abc.abstractmethod
    def submit(self, requests: dict[str, ModelRequest], base: str,
               display_name: str) -> BatchJob:
        """Creates one job asking `requests` (label -> request); its files live at
        `base` (a path prefix the caller owns)."""

    @abc.abstractmethod
    def get(self, name: str) -> BatchJob:
        ...

    @abc.abstractmethod
    def find(self, display_name: str) -> Optional[BatchJob]:
        """The newest job of that display name that did not end without answers: the
        one a run killed before it could record its job created."""

    @abc.abstractmethod
    def cancel(self, name: str) -> None:
        ...

    @abc.abstractmethod
    def retrieve(self, job: BatchJob, requests: dict[str, ModelRequest]) -> BatchAnswers:
        """The answers a finished job wrote, by the labels of `requests`."""


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
        return custom_backend_class(config.spec.model)(config)
    raise ValueError(f"no backend for {config.uri}")


def custom_backend_class(name: str) -> type:
    """`package.module:Class` of a custom: URI, imported; a clear error where it is
    not there or not a Backend (checked before a run, not on its first call)."""
    import importlib
    module_name, _, class_name = name.partition(":")
    try:
        backend_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise TypeError(f"cannot load {name} ({type(e).__name__}: {e})") from None
    if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
        raise TypeError(f"{class_name} is not a Backend subclass")
    return backend_class
