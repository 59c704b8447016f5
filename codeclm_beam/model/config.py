"""`ModelConfig`: everything a worker needs to call one model, and nothing secret.

It is pickled into the pipeline (and so into a Dataflow job's graph), which is why API
keys are not fields: backends read them from the worker's environment when the client is
created, and they never appear in options, manifests or logs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from codeclm_beam.model.concurrency import ADAPTIVE
from codeclm_beam.model.concurrency import CONCURRENCY_MODES
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.ratelimit import QuotaConfig
from codeclm_beam.model.thinking import DEFAULT
from codeclm_beam.model.thinking import LEAST
from codeclm_beam.model.thinking import Thinking
from codeclm_beam.model.thinking import parse_thinking
from codeclm_beam.model.thinking import resolve_thinking
from codeclm_beam.model.uri import DEFAULT_MODEL_URI
from codeclm_beam.model.uri import ModelSpec
from codeclm_beam.redact import public_url


ONLINE, FLEX, BATCH = "online", "flex", "batch"
VERTEX_MODES = (ONLINE, FLEX, BATCH)
ROLES = ("strong", "target", "judge")


def parse_vertex_modes(text: str) -> dict[str, str]:
    """--vertex_mode: one mode for every role ("batch"), a mode per role
    ("judge=batch,strong=online"), or both ("batch,strong=online": every role in
    batch but the strong model). Roles not named are online."""
    modes = dict.fromkeys(ROLES, ONLINE)
    named = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        role, _, mode = part.rpartition("=")
        if mode not in VERTEX_MODES or (role and role not in ROLES):
            raise ConfigurationError(
                f"--vertex_mode {text!r}: a mode ({', '.join(VERTEX_MODES)}) or "
                f"ROLE=MODE pairs, ROLE one of {', '.join(ROLES)}")
        if role:
            named[role] = mode
        else:
            modes = dict.fromkeys(ROLES, mode)
    return {**modes, **named}
# Flex PayGo requests may queue: Vertex AI allows them up to 30 minutes.
FLEX_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How a `vertex_mode="batch"` model's requests go out as Vertex AI batch
    prediction jobs (`codeclm_beam.model.batch`)."""

    # Where request shards, job records and (by default) results live: gs:// on
    # Dataflow and wherever Vertex AI must read them (google-genai takes gs:// or bq://
    # sources only).
    batch_dir: Optional[str] = None
    # Vertex AI takes up to 200,000 requests and 1 GB of input a job.
    max_requests_per_job: int = 200_000
    max_bytes_per_job: int = 1_000_000_000
    # A job not finished this long after it was created is cancelled: its completed
    # lines are kept (they are billed), the rest is dead-lettered or, with
    # fallback="online", sent online at the online price. Vertex AI itself cancels
    # work not done within 24 h of a job starting, and a job may queue before that.
    timeout_s: float = 48 * 3600.0
    fallback: Optional[str] = None
    # Polling a job: exponential backoff from the first to the longest wait.
    poll_initial_s: float = 10.0
    poll_max_s: float = 300.0

    def __post_init__(self):
        if self.fallback not in (None, ONLINE):
            raise ConfigurationError(f"batch fallback {self.fallback!r}: none or online")
        if self.max_requests_per_job < 1 or self.max_bytes_per_job < 1:
            raise ConfigurationError("batch job limits must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    uri: str = DEFAULT_MODEL_URI
    # Vertex AI project and location; default to GOOGLE_CLOUD_PROJECT and
    # GOOGLE_CLOUD_LOCATION, as google-genai does.
    project: Optional[str] = None
    location: Optional[str] = None
    # Endpoint override for vertex:/gemini: URIs (a proxy, or a loopback test server).
    base_url: Optional[str] = None
    # A google.auth credentials object for vertex: (instead of Application Default
    # Credentials). Left out of repr and comparisons so it is never printed.
    credentials: Any = dataclasses.field(default=None, repr=False, compare=False)
    request_timeout_s: float = 300.0
    # Requests in flight at once per worker process and model, across all bundles:
    # the ceiling of an adaptive limit, or the limit itself (`concurrency`).
    max_concurrency: int = 64
    # "adaptive" (AIMD under the ceiling, the default) or "fixed".
    concurrency: str = ADAPTIVE
    max_retries: int = 6
    max_parse_retries: int = 2
    # Re-sends with a larger output limit after an answer stopped at the limit.
    max_truncation_retries: int = 1
    # This role's thinking setting as the user wrote it (`codeclm_beam.model.thinking`);
    # None lets each stage choose (least for structured stages and the judge, the
    # model's default for answers).
    thinking: Optional[str] = None
    # Stop the run when more than this share of a window of calls to the model
    # failed at the service (`guard.ErrorShareGuard`); 1 never stops.
    max_error_share: float = 0.5
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    quota: QuotaConfig = QuotaConfig()
    # None turns the response cache off.
    cache_dir: Optional[str] = None
    # How a vertex: model is served and billed (`pricing.PRICE_FACTOR`): "online"
    # (standard pay-as-you-go), "flex" (Flex PayGo: the same requests on the global
    # endpoint at half price, slower and with longer timeouts, for the models that
    # offer it) or "batch" (batch prediction jobs at half price, `batch`). Other
    # backends ignore it.
    vertex_mode: str = "online"
    # For vertex_mode="batch".
    batch: BatchConfig = BatchConfig()
    # Embedded llama.cpp only.
    n_ctx: int = 4096
    n_threads: Optional[int] = None

    def __post_init__(self):
        ModelSpec.parse(self.uri)  # fail at pipeline construction, not on a worker
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.concurrency not in CONCURRENCY_MODES:
            raise ConfigurationError(f"concurrency {self.concurrency!r}: one of "
                                     f"{', '.join(CONCURRENCY_MODES)}")
        if min(self.max_retries, self.max_parse_retries, self.max_truncation_retries) < 0:
            raise ValueError("retry counts cannot be negative")
        if self.vertex_mode not in VERTEX_MODES:
            raise ConfigurationError(f"vertex_mode {self.vertex_mode!r}: one of "
                                     f"{', '.join(VERTEX_MODES)}")
        # Other backends ignore the mode (`billing_mode`).
        if self.billing_mode == FLEX:
            if self.location not in (None, "global"):
                raise ConfigurationError(f"{self.uri}: Flex PayGo is served on the global "
                                         f"endpoint, not in {self.location}")
        if self.billing_mode == BATCH and not str(self.batch.batch_dir or "").startswith(
                "gs://"):
            raise ConfigurationError(
                f"{self.uri}: --vertex_mode batch needs --batch_dir gs://BUCKET/PATH: "
                "Vertex AI batch prediction reads its requests from and writes its "
                "answers to Cloud Storage")
        object.__setattr__(self, "thinking", parse_thinking(self.thinking))
        # A setting this model cannot take is refused here, before any call.
        for stage_default in (LEAST, DEFAULT):
            self.thinking_for(stage_default)

    def thinking_for(self, stage_default: str) -> Thinking:
        """What a stage whose own default is `stage_default` sends to this model."""
        spec = self.spec
        return resolve_thinking(spec.backend, spec.model, self.thinking, stage_default)

    @property
    def billing_mode(self) -> str:
        """How this model's calls are billed: its vertex_mode on Vertex AI, else
        online. A tuned model's endpoint is called online whatever the mode: Flex
        PayGo and batch prediction serve Google's published models."""
        spec = self.spec
        return self.vertex_mode if spec.backend == "vertex" and not spec.endpoint \
            else ONLINE

    def metered_id(self, mode: Optional[str] = None) -> str:
        """The model id a call's counters carry: the identity for online calls,
        marked with the mode for the others (flex, batch), so one model that two
        roles call in two modes (a batch judge, an online strong model) is priced at
        each mode's rate, and so are a batch model's calls sent online by
        --batch_fallback."""
        mode = mode or self.billing_mode
        return self.identity if mode == ONLINE else f"{self.identity}~{mode}"

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.parse(self.uri)

    @property
    def identity(self) -> str:
        """What identifies the model wherever answers are shared or counted: response
        cache keys, thread pools, quotas and metrics (`ModelSpec.identity`, plus the
        endpoint override of a vertex:/gemini: model, which may be another server)."""
        spec = self.spec
        if spec.backend in ("vertex", "gemini") and self.base_url:
            return f"{spec.identity}@{public_url(self.base_url)}"
        return spec.identity

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
