"""`ModelConfig`: everything a worker needs to call one model, and nothing secret.

It is pickled into the pipeline (and so into a Dataflow job's graph), which is why API
keys are not fields: backends read them from the worker's environment when the client is
created, and they never appear in options, manifests or logs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from codeclm_beam.model.ratelimit import QuotaConfig
from codeclm_beam.model.uri import DEFAULT_MODEL_URI
from codeclm_beam.model.uri import ModelSpec


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
    # Requests in flight at once per worker process, across all bundles.
    max_concurrency: int = 8
    max_retries: int = 6
    max_parse_retries: int = 2
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    quota: QuotaConfig = QuotaConfig()
    # None turns the response cache off.
    cache_dir: Optional[str] = None
    # Embedded llama.cpp only.
    n_ctx: int = 4096
    n_threads: Optional[int] = None

    def __post_init__(self):
        ModelSpec.parse(self.uri)  # fail at pipeline construction, not on a worker
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_retries < 0 or self.max_parse_retries < 0:
            raise ValueError("retry counts cannot be negative")

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.parse(self.uri)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
