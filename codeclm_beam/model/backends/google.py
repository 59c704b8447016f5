"""Gemini through google-genai: `vertex:` (Vertex AI, ADC) and `gemini:` (Developer API).

Beam's own GeminiModelHandler is not used: its stock request function sends a whole
batch as one `contents=[...]` list, which google-genai turns into ONE request with N
parts, and zips N inputs with one answer. Here every element is its own request.
google-genai's own retries stay off (no `retry_options`) because the model layer's
client owns them (`client.py`).
"""
from __future__ import annotations

import os

from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import ModelUnusable
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.backends.deadline import deadline_transport
from codeclm_beam.model.backends.google_errors import translate_error
from codeclm_beam.model.config import FLEX
from codeclm_beam.model.config import FLEX_TIMEOUT_S
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.thinking import output_token_limit
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import Usage


FLEX_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"


class GoogleGenAIBackend(Backend):
    def __init__(self, config: ModelConfig):
        from google import genai
        from google.genai import types

        self._types = types
        self._backend = config.spec.backend
        # A tuned model is called at its endpoint, in the endpoint's location, and
        # thinks (so needs room for thought) as its base model, named before the @.
        self._model = config.spec.endpoint or config.spec.model
        self._thinks_as = config.spec.model
        flex = config.billing_mode == FLEX
        timeout_s = (max(config.request_timeout_s, FLEX_TIMEOUT_S) if flex
                     else config.request_timeout_s)
        self.request_timeout_s = timeout_s
        http_options = types.HttpOptions(
            timeout=int(timeout_s * 1000),
            client_args={"transport": deadline_transport(timeout_s, config.max_concurrency)},
            base_url=config.base_url or None,
            # Flex PayGo: the same request, served from shared capacity at half price.
            headers={FLEX_HEADER: "flex"} if flex else None)
        if config.spec.backend == "vertex":
            project = (config.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
                       or config.spec.endpoint_project)
            location = ("global" if flex else config.spec.endpoint_location
                        or config.location or os.environ.get("GOOGLE_CLOUD_LOCATION")
                        or "us-central1")
            if not project:
                raise PermanentModelError(
                    f"{config.uri}: set --vertex_project or GOOGLE_CLOUD_PROJECT")
            self._client = genai.Client(
                vertexai=True, project=project, location=location,
                credentials=config.credentials or _token_credentials(),
                http_options=http_options)
        else:
            api_key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
            if not api_key:
                raise PermanentModelError(
                    f"{config.uri}: set GEMINI_API_KEY (or GOOGLE_API_KEY)")
            self._client = genai.Client(api_key=api_key, http_options=http_options)

    def check_model(self, timeout_s: float) -> None:
        """`models.get`: the model's metadata, a read that is not billed. Refused
        credentials or a model the service does not know stop the run before any
        stage; 429 and 5xx say the service is there (the run's retries deal with
        them)."""
        from google.auth import exceptions as auth_errors
        from google.genai import errors as genai_errors
        try:
            self._client.models.get(model=self._model, config={
                "http_options": {"timeout": int(timeout_s * 1000)}})
        except auth_errors.GoogleAuthError as e:
            raise ModelUnusable(f"no usable Google Cloud credentials ({type(e).__name__}): "
                                "run `gcloud auth application-default login`, or set "
                                "GOOGLE_APPLICATION_CREDENTIALS") from None
        except genai_errors.APIError as e:
            if e.code in (401, 403):
                raise ModelUnusable(
                    f"the service refused the credentials ({e.code} {e.status}); the "
                    "account needs Vertex AI User (roles/aiplatform.user) on the "
                    "project" if self._backend == "vertex" else
                    f"the service refused the key ({e.code} {e.status}); check "
                    "GEMINI_API_KEY") from None
            if e.code == 404:
                raise ModelUnusable(f"the service does not know model {self._model!r} "
                                    f"(404 {e.status}); check its name and "
                                    "--vertex_location") from None
        except Exception as e:  # httpx: refused, unknown host, no answer in time
            raise ModelUnusable(f"cannot be reached ({type(e).__name__}: {e}); check "
                                "--model_base_url and the network") from None

    def _config(self, request: ModelRequest):
        types = self._types
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        schema = request.json_schema
        settings = request.settings
        thinking = settings.thinking
        thinking_config = None
        if thinking.budget is not None:
            thinking_config = types.ThinkingConfig(thinking_budget=thinking.budget)
        elif thinking.level is not None:
            thinking_config = types.ThinkingConfig(
                thinking_level=types.ThinkingLevel(thinking.level.upper()))
        return types.GenerateContentConfig(
            system_instruction=system or None,
            temperature=settings.temperature,
            # Thought tokens count against this limit: leave them room.
            max_output_tokens=output_token_limit(
                self._backend, self._thinks_as, settings.max_output_tokens, thinking),
            thinking_config=thinking_config,
            seed=settings.seed,
            response_mime_type="application/json" if schema else None,
            response_json_schema=schema,
            candidate_count=1,
        )

    def _contents(self, request: ModelRequest) -> list:
        types = self._types
        return [types.Content(role="model" if m.role == "assistant" else "user",
                              parts=[types.Part(text=m.content)])
                for m in request.messages if m.role != "system"]

    def generate(self, request: ModelRequest) -> RawAnswer:
        try:
            response = self._client.models.generate_content(
                model=self._model, contents=self._contents(request),
                config=self._config(request))
        except Exception as e:
            raise translate_error(e) from e
        return _raw_answer(response)

    # -- batch prediction: the same request as a JSONL line, its answer read back --
    @property
    def client(self):
        return self._client

    @property
    def model(self) -> str:
        return self._model

    def batch_jobs(self):
        """Vertex AI's `batchPredictionJobs` (the Gemini API's batch mode is not
        offered: --vertex_mode is Vertex AI's)."""
        if self._backend != "vertex":
            return None
        from codeclm_beam.model.backends.vertex_batch import VertexBatchJobs
        return VertexBatchJobs(self)

    def rest_request(self, request: ModelRequest, labels: dict[str, str]) -> dict:
        """The request as Vertex AI's REST `GenerateContentRequest`, the form a batch
        prediction input line takes: what `generate` would send, built from the same
        `GenerateContentConfig`. `labels` come back with the answer line."""
        generation = self._config(request).model_dump(
            mode="json", by_alias=True, exclude_none=True)
        system = generation.pop("systemInstruction", None)
        body = {"contents": [content.model_dump(mode="json", by_alias=True,
                                                exclude_none=True)
                             for content in self._contents(request)],
                "generationConfig": generation, "labels": labels}
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def answer_from(self, response: dict) -> RawAnswer:
        """A batch output line's `response` (a REST `GenerateContentResponse`) read
        exactly as an online answer."""
        return _raw_answer(self._types.GenerateContentResponse.model_validate(response))


def _raw_answer(response) -> RawAnswer:
    if not response.candidates:
        feedback = getattr(response, "prompt_feedback", None)
        raise PermanentModelError(f"no candidates returned (prompt feedback: {feedback})")
    candidate = response.candidates[0]
    finish = candidate.finish_reason
    finish_name = getattr(finish, "name", None) or str(finish or "STOP")
    text = "".join(part.text or "" for part in (candidate.content.parts or [])
                   if not getattr(part, "thought", False)) if candidate.content else ""
    usage = response.usage_metadata
    return RawAnswer(text=text, finish_reason=finish_name, usage=Usage(
        prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
        cached_prompt_tokens=(usage.cached_content_token_count or 0) if usage else 0,
        completion_tokens=(usage.candidates_token_count or 0) if usage else 0,
        thoughts_tokens=(usage.thoughts_token_count or 0) if usage else 0))


def _token_credentials():
    """An OAuth access token from CODECLM_VERTEX_ACCESS_TOKEN (e.g. `gcloud auth
    print-access-token`, or a fake one for a loopback server); None leaves
    google-genai to find Application Default Credentials. Read on the worker, never
    passed through options, and redacted wherever it could be echoed."""
    token = os.environ.get("CODECLM_VERTEX_ACCESS_TOKEN")
    if not token:
        return None
    from google.oauth2.credentials import Credentials
    return Credentials(token=token)
