"""The one request and response shape every model call in codeclm-beam uses.

Stages build `ModelRequest`s; backends turn them into wire calls; the model layer returns a
`ModelResponse` or, when the call could not be completed, a `ModelFailure`. Both are
plain frozen dataclasses so they pickle and compare cheaply across Beam workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional, Union

from codeclm_beam.model.thinking import Thinking


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str

    def __post_init__(self):
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {self.role!r}")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.7
    # The visible answer's budget. What is sent adds the thinking the request allows
    # (`thinking.output_token_limit`).
    max_output_tokens: int = 1024
    # How much the model may think (resolved per model and stage before any call).
    thinking: Thinking = Thinking()
    # Seeded sampling makes a prompt's answer reproducible where the backend honours
    # it (llama.cpp, OpenAI-compatible servers, Gemini), which is what lets the
    # response cache answer a whole re-run.
    seed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    """One chat call. `request_id` names the element (for dead letters and logs); it is
    deliberately not part of the cache key, which depends only on what is sent."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    settings: GenerationSettings = GenerationSettings()
    # The JSON schema the answer must satisfy, as canonical JSON text so the request
    # stays hashable and its cache key does not depend on dict ordering.
    json_schema_text: Optional[str] = None

    @classmethod
    def create(
        cls,
        request_id: str,
        messages: list[ChatMessage] | tuple[ChatMessage, ...],
        settings: GenerationSettings = GenerationSettings(),
        json_schema: Optional[dict] = None,
    ) -> "ModelRequest":
        schema_text = canonical_json(json_schema) if json_schema is not None else None
        return cls(request_id, tuple(messages), settings, schema_text)

    @property
    def json_schema(self) -> Optional[dict]:
        return json.loads(self.json_schema_text) if self.json_schema_text else None

    def with_seed(self, seed: Optional[int]) -> "ModelRequest":
        return dataclasses.replace(
            self, settings=dataclasses.replace(self.settings, seed=seed))

    def with_max_output_tokens(self, tokens: int) -> "ModelRequest":
        return dataclasses.replace(
            self, settings=dataclasses.replace(self.settings, max_output_tokens=tokens))

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def cache_key(self, backend_id: str) -> str:
        """Hash of backend, model, messages, settings and schema."""
        payload = {
            "backend": backend_id,
            "messages": [[m.role, m.content] for m in self.messages],
            "settings": dataclasses.asdict(self.settings),
            "schema": self.json_schema_text,
        }
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Usage:
    """Tokens as billed, the one place their kinds are named: prompt (of which cached,
    billed at the cached-input rate), visible output, and thoughts (billed as output,
    not part of completion_tokens, as Gemini counts them)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    thoughts_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(a + b for a, b in zip(dataclasses.astuple(self),
                                             dataclasses.astuple(other))))

    @property
    def billed(self) -> int:
        """What the "tokens" figures count: prompt, output and thoughts (and what an
        OpenAI-style token quota counts: `quota_tokens`)."""
        return self.prompt_tokens + self.completion_tokens + self.thoughts_tokens

    def quota_tokens(self, backend: str) -> int:
        """What the tokens-per-minute quota of a `backend` (a model URI's scheme)
        counts of this usage. Charging a thinking model's thoughts to Vertex AI's
        input-token quota held it to a fraction of that quota (at the ideal pace of
        the bench's realistic run, 0.71 of it)."""
        return self.prompt_tokens if backend in INPUT_ONLY_TOKEN_QUOTA else self.billed

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Usage":
        return cls(**{kind: values.get(kind, 0) for kind in TOKEN_KINDS})


TOKEN_KINDS = tuple(field.name for field in dataclasses.fields(Usage))
# The backends whose service's tokens-per-minute quota counts input tokens only:
# Vertex AI's (generate_content_input_tokens_per_minute_per_base_model) and the Gemini
# API's. OpenAI's counts output too, and a server with no quota of its own is held to
# the user's as OpenAI's would hold it.
INPUT_ONLY_TOKEN_QUOTA = ("vertex", "gemini")
# `Paid` as a flat record (the cache entry's "paid", the counters' paid_before_*).
PAID_FIELDS = ("requests", *TOKEN_KINDS)


@dataclasses.dataclass(frozen=True)
class Paid:
    """What an answer cost: the requests sent for it (every attempt) and their usage."""

    requests: int = 0
    usage: Usage = Usage()

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, **self.usage.as_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "Paid":
        return cls(values.get("requests", 0), Usage.from_dict(values))


@dataclasses.dataclass(frozen=True)
class CallStats:
    """What it took to answer one request; summed into Beam metrics per stage."""

    attempts: int = 0  # backend calls actually sent (0 for a cache hit)
    retries: int = 0  # transport retries (429/5xx/timeouts)
    parse_retries: int = 0  # re-asks after an answer failed its schema
    # Re-sends with a larger output limit after an answer stopped at the limit.
    truncation_retries: int = 0
    # The call ended as a TruncatedAnswer.
    truncated: bool = False
    cache_hit: bool = False
    throttled_seconds: float = 0.0
    # Tokens as billed, over every attempt.
    usage: Usage = Usage()
    # A cache hit: what the run that asked paid for this answer; counted apart, as
    # "paid before".
    paid_before: Optional[Paid] = None


@dataclasses.dataclass(frozen=True)
class ModelResponse:
    text: str
    # The parsed JSON answer, validated against the request's schema; None for a
    # free-text request.
    data: Any
    finish_reason: str
    # This answer's own tokens (the last attempt); `stats.usage` counts every attempt.
    usage: Usage = Usage()
    stats: CallStats = CallStats()


@dataclasses.dataclass(frozen=True)
class ModelFailure:
    """A request that could not be answered after all retries."""

    request_id: str
    error_class: str
    message: str
    attempts: int
    raw_answer: Optional[str] = None
    stats: CallStats = CallStats()
    # Why, in one word (`errors.failure_reason`): truncated, schema, transient, ...
    reason: str = "error"
    # The model's finish reason of the last answer, when one arrived.
    finish_reason: Optional[str] = None


ModelResult = Union[ModelResponse, ModelFailure]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
