"""Contract tests of retries and redaction through the real client libraries: an
OpenAI-compatible loopback server that throttles with Retry-After, and the Gemini
Developer API (gemini:) with an API key that must never leak."""
import time

import pytest

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelFailure
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse
from tests.loopback import RecordingServer

SECRET = "sk-test-0123456789abcdefSECRET"
GEMINI_SECRET = "AIzaTESTKEY0123456789abcdefghij"


def request(text, schema=None):
    return ModelRequest.create("r1", [ChatMessage("user", text)],
                               GenerationSettings(0.0, 32, seed=3), schema)


def openai_responder(state):
    def respond(method, path, body, headers):
        state.setdefault("auth", []).append(headers.get("authorization"))
        prompt = body["messages"][-1]["content"]
        if prompt == "throttle me" and state.get("throttled", 0) < 2:
            state["throttled"] = state.get("throttled", 0) + 1
            return 429, {"error": {"message": "slow down", "type": "rate_limit"}}, \
                {"retry-after": "1"}
        if prompt == "echo":
            # A server that echoes the request, headers included, in its error.
            return 400, {"error": {"message": f"bad request; headers were {headers}",
                                   "type": "invalid_request_error"}}, {}
        if prompt == "broken json":
            return 200, {"id": "x", "object": "chat.completion", "created": 0,
                         "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": '{"a": '}}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                   "total_tokens": 5}}, {}
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": '{"a": 1}'}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                               "total_tokens": 7}}, {}
    return respond


@pytest.fixture
def openai_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    state = {}
    server = RecordingServer(openai_responder(state))
    with server.running():
        yield server, state


def test_retry_after_is_honoured(openai_server):
    server, state = openai_server
    client = ModelClient(ModelConfig(uri=f"openai:m@{server.base_url}/v1",
                                     initial_backoff_s=0.01))
    started = time.monotonic()
    result = client.call(request("throttle me", {"type": "object"}))
    elapsed = time.monotonic() - started
    assert isinstance(result, ModelResponse) and result.data == {"a": 1}
    assert result.stats.retries == 2 and result.stats.attempts == 3
    assert elapsed >= 2.0  # two waits of Retry-After: 1, not the 0.01 s backoff
    assert state["auth"][0] == f"Bearer {SECRET}"


def test_schema_failures_are_re_asked_then_dead_lettered(openai_server):
    server, _ = openai_server
    client = ModelClient(ModelConfig(uri=f"openai:m@{server.base_url}/v1",
                                     max_parse_retries=2))
    result = client.call(request("broken json", {"type": "object"}))
    assert isinstance(result, ModelFailure)
    assert result.error_class == "SchemaMismatch" and result.attempts == 3
    assert result.raw_answer == '{"a": '
    sent_seeds = [r["body"]["seed"] for r in server.requests]
    assert len(set(sent_seeds)) == 3  # each re-ask samples with its own seed


def test_a_server_echoing_the_key_never_leaks_it(openai_server, caplog):
    server, _ = openai_server
    client = ModelClient(ModelConfig(uri=f"openai:m@{server.base_url}/v1"))
    result = client.call(request("echo"))
    assert isinstance(result, ModelFailure) and result.error_class == "PermanentModelError"
    assert SECRET not in repr(result) and "[REDACTED]" in result.message
    assert SECRET not in caplog.text


def test_gemini_developer_api_sends_the_key_and_never_shows_it(monkeypatch, caplog):
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_SECRET)

    def respond(method, path, body, headers):
        if "bad" in body["contents"][0]["parts"][0]["text"]:
            return 403, {"error": {"code": 403, "status": "PERMISSION_DENIED",
                                   "message": f"key {headers.get('x-goog-api-key')} "
                                              "is not valid"}}, {}
        return 200, {"candidates": [{"content": {"role": "model", "parts": [
            {"text": "hello"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 1}}, {}

    server = RecordingServer(respond)
    with server.running():
        client = ModelClient(ModelConfig(uri="gemini:gemini-test",
                                         base_url=server.base_url))
        ok = client.call(request("hi"))
        bad = client.call(request("bad"))
    assert isinstance(ok, ModelResponse) and ok.text == "hello"
    assert server.requests[0]["path"].endswith("/models/gemini-test:generateContent")
    assert server.requests[0]["headers"]["x-goog-api-key"] == GEMINI_SECRET
    assert isinstance(bad, ModelFailure) and "403" in bad.message
    assert GEMINI_SECRET not in repr(bad) and GEMINI_SECRET not in caplog.text
