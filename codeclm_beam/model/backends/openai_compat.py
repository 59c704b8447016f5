"""Any OpenAI-compatible chat server: vLLM, Ollama, llama.cpp server, TGI.

The openai client's own retries are off (`max_retries=0`): the model layer's client
owns retries (`client.py`).

The schema goes as OpenAI's `response_format: {"type": "json_schema", ...}`. Servers
that only know the older `{"type": "json_object", "schema": ...}` dialect (llama.cpp's
Python server, Anyscale-style endpoints) reject that with an error naming
`response_format` (llama_cpp.server even answers 500); the backend then switches to
that dialect once and remembers it for the process.
"""
from __future__ import annotations

import os
import urllib.parse

from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import ModelUnusable
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.backends.deadline import deadline_transport
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import TransientModelError
from codeclm_beam.model.errors import classify_http_status
from codeclm_beam.model.errors import parse_retry_after
from codeclm_beam.model.thinking import output_token_limit
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import Usage
from codeclm_beam.redact import excerpt


def client_url(base_url: str) -> tuple[str, dict[str, str]]:
    """The base URL as the openai client needs it: a password that holds '@' (the host
    follows the last '@') percent-encoded, and query parameters (`?key=...`) sent with
    every request instead of breaking the path the client appends."""
    scheme, _, rest = base_url.partition("://")
    end = min([i for i in (rest.find("/"), rest.find("?")) if i != -1] or [len(rest)])
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        authority = (urllib.parse.quote(urllib.parse.unquote(user), safe="")
                     + (":" + urllib.parse.quote(urllib.parse.unquote(password), safe="")
                        if colon else "") + "@" + host)
    path, _, query = tail.partition("?")
    return (f"{scheme}://{authority}{path}",
            dict(urllib.parse.parse_qsl(query.partition("#")[0], keep_blank_values=True)))


class OpenAICompatibleBackend(Backend):
    def __init__(self, config: ModelConfig):
        import openai

        spec = config.spec
        self._openai = openai
        self._model = spec.model
        self._schema_dialect = "json_schema"
        base_url, query = client_url(spec.base_url)
        self._client = openai.OpenAI(
            base_url=base_url,
            default_query=query or None,
            # Local servers need no key, but the client insists on one.
            api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
            max_retries=0,
            timeout=config.request_timeout_s,
            http_client=openai.DefaultHttpxClient(transport=deadline_transport(
                config.request_timeout_s, config.max_concurrency, _httpx_of(openai))))

    def _response_format(self, schema: dict) -> dict:
        if self._schema_dialect == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        return {"type": "json_object", "schema": schema}

    def generate(self, request: ModelRequest) -> RawAnswer:
        schema = request.json_schema
        try:
            try:
                response = self._send(request, schema)
            except self._openai.APIStatusError as e:
                if not self._rejects_schema_dialect(e, schema):
                    raise
                self._schema_dialect = "json_object"
                response = self._send(request, schema)
        except self._openai.APIStatusError as e:
            raise classify_http_status(
                e.status_code, f"{e.status_code}: {e.message}",
                parse_retry_after(e.response.headers.get("retry-after"))) from e
        except Exception as e:  # timeouts, dropped connections, unreadable bodies
            cause = f" ({e.__cause__})" if e.__cause__ and str(e.__cause__) else ""
            raise TransientModelError(f"{type(e).__name__}: {e}{cause}") from e
        response = _json_body(response)
        choices = response.get("choices") or []
        if not choices:
            raise TransientModelError("the server returned no choices")
        choice = choices[0]
        usage = response.get("usage") or {}
        # OpenAI counts reasoning inside completion_tokens; keep visible and thought
        # tokens apart, as Gemini reports them.
        reasoning = (usage.get("completion_tokens_details") or {}).get(
            "reasoning_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        return RawAnswer(
            text=(choice.get("message") or {}).get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(
                prompt_tokens=usage.get("prompt_tokens") or 0,
                cached_prompt_tokens=(usage.get("prompt_tokens_details") or {}).get(
                    "cached_tokens") or 0,
                completion_tokens=max(0, completion - reasoning),
                thoughts_tokens=reasoning))

    def check_model(self, timeout_s: float) -> None:
        """The server's model list (nothing billed), and when the model is not in it,
        one chat request of one token: llama.cpp's servers answer under any model
        name, vLLM and OpenAI refuse a name they do not serve."""
        openai, client = self._openai, self._client.with_options(timeout=timeout_s)
        try:
            try:
                listed = [m.id for m in client.models.list().data]
            except openai.NotFoundError:
                listed = None  # a server without a model list
            names = {self._model, f"{self._model}:latest"}  # Ollama's default tag
            if listed is not None and names & set(listed):
                return
            client.chat.completions.create(
                model=self._model, messages=[{"role": "user", "content": "ping"}],
                max_tokens=1)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise ModelUnusable(
                f"the server refused the credentials ({e.status_code}); check "
                "OPENAI_API_KEY (or the key in the URL)") from None
        except (openai.NotFoundError, openai.BadRequestError,
                openai.UnprocessableEntityError) as e:
            served = (f"; the server serves {', '.join(sorted(listed)[:5])}"
                      if listed else "")
            raise ModelUnusable(f"the server does not know model {self._model!r} "
                                f"({e.status_code}){served}") from None
        except openai.APITimeoutError:
            raise ModelUnusable(f"no answer in {timeout_s:g} s; check that the server "
                                "is running and the host and port are right") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__
            while cause is not None and cause.__cause__ is not None:
                cause = cause.__cause__
            reason = (getattr(cause, "strerror", None) or str(cause or e)).strip()
            raise ModelUnusable(f"cannot be reached ({reason}); check that the server "
                                "is running and the host and port are right") from None
        except openai.APIStatusError as e:
            if e.status_code >= 500:
                raise ModelUnusable(f"the server answered {e.status_code} to a one-token "
                                    "request; check its log") from None
            raise ModelUnusable(f"the server refused a one-token request "
                                f"({e.status_code})") from None

    def _rejects_schema_dialect(self, error, schema) -> bool:
        return (schema is not None and self._schema_dialect == "json_schema"
                and error.status_code in (400, 422, 500)
                and "response_format" in error.response.text)

    def _send(self, request: ModelRequest, schema) -> "httpx.Response":
        settings = request.settings
        body = {"model": self._model,
                "messages": [{"role": m.role, "content": m.content}
                             for m in request.messages],
                "temperature": settings.temperature,
                "max_tokens": output_token_limit("openai", self._model,
                                                 settings.max_output_tokens,
                                                 settings.thinking)}
        if schema is not None:
            body["response_format"] = self._response_format(schema)
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.thinking.level is not None:
            body["reasoning_effort"] = settings.thinking.level
        # The body as the API documents it, through the client's own request path
        # (its errors, timeouts and headers), without `create`'s conversion of the
        # body through its typed signature and of the answer into pydantic models: a
        # third of the CPU a call cost, and the client's CPU is what caps requests in
        # flight under one interpreter lock (docs/performance.md).
        import httpx  # the openai client's own transport, imported with it
        return self._client.post("/chat/completions", body=body, cast_to=httpx.Response)


def _json_body(response: "httpx.Response") -> dict:
    """The answer's JSON object, or a transient error saying what came back instead
    (a proxy's or captive portal's HTML page with a 200, a cut body): its content type
    and first characters, redacted."""
    kind = response.headers.get("content-type", "?")
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    raise TransientModelError(
        f"the server answered {response.status_code} with {kind}, not a JSON object: "
        f"{excerpt(response.text[:200])!r}")


def _httpx_of(openai) -> str:
    """The httpx the openai client is built on (its own fork, httpx2, in 3.x)."""
    for cls in openai.DefaultHttpxClient.__mro__[1:]:
        if cls.__name__ == "Client":
            return cls.__module__.split(".")[0]
    return "httpx"
