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


def test_a_registered_secret_is_redacted_in_every_encoding():
    import itertools
    import urllib.parse

    from codeclm_beam.redact import REDACTED
    from codeclm_beam.redact import redact
    from codeclm_beam.redact import register_url_secrets
    secret = "Ab+d/Gh=jK 01é"
    register_url_secrets("http://h/v1?key=" + urllib.parse.quote(secret, safe=""))

    def forms(char):
        encoded = "".join(f"%{b:02X}" for b in char.encode())
        found = {char, encoded, encoded.lower()}
        return found | {"+"} if char == " " else found
    # Every mixture of the characters that quoting changes, plus the usual whole forms.
    special = [i for i, c in enumerate(secret) if urllib.parse.quote(c, safe="") != c]
    echoed = {urllib.parse.quote(secret), urllib.parse.quote_plus(secret),
              urllib.parse.quote(secret, safe="")}
    for choice in itertools.product(*(sorted(forms(secret[i])) for i in special)):
        chars = list(secret)
        for index, form in zip(special, choice):
            chars[index] = form
        echoed.add("".join(chars))
    assert len(echoed) > 100
    for text in echoed:
        assert redact(f"400 for /v1/chat/completions?key={text} (bad)") == \
            f"400 for /v1/chat/completions?key={REDACTED} (bad)", text


def test_a_200_with_an_html_page_is_a_transient_error_saying_what_came_back(caplog):
    from benchmarks.fake_model_server import FakeModelServer
    from benchmarks.fake_model_server import ServerConfig
    with FakeModelServer(ServerConfig(fault_rate=1.0, faults=("html",))) as server:
        client = ModelClient(ModelConfig(uri=f"openai:m@{server.base_url}/v1",
                                         max_retries=1, initial_backoff_s=0.01))
        result = client.call(request("hello", {"type": "object"}))
    assert isinstance(result, ModelFailure) and result.reason == "transient"
    assert result.attempts == 2  # retried as any transient fault is
    assert "200 with text/html" in result.message and "<!DOCTYPE html>" in result.message
    assert "Traceback" not in caplog.text and "has no attribute" not in result.message


def _answer_body(path: str, text: str, tokens: int) -> dict:
    """A finished answer as an OpenAI-compatible server or Vertex AI's generateContent
    sends it."""
    if path.endswith("/chat/completions"):
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": tokens}}
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": tokens}}


class _Trickle:
    """A server that answers 200 and then sends its (valid) body 16 bytes every
    0.3 s: each read well within any read timeout, the whole over 15 s."""

    def __init__(self):
        import http.server
        import json
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                data = json.dumps(_answer_body(self.path, "ok " * 200, 200)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    for start in range(0, len(data), 16):
                        self.wfile.write(data[start:start + 16])
                        self.wfile.flush()
                        time.sleep(0.3)
                except OSError:
                    pass  # the client gave up: what the test wants

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("uri", ["openai:m@{url}/v1", "vertex:gemini-2.5-flash-lite"])
def test_request_timeout_bounds_the_whole_request_not_each_read(uri, monkeypatch):
    monkeypatch.setenv("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    trickle = _Trickle()
    try:
        config = ModelConfig(uri=uri.format(url=trickle.url), request_timeout_s=2.0,
                             max_retries=0, project="p", location="us-central1",
                             base_url=None if uri.startswith("openai") else trickle.url)
        started = time.monotonic()
        result = ModelClient(config).call(request("hello"))
        elapsed = time.monotonic() - started
    finally:
        trickle.server.shutdown()
    assert isinstance(result, ModelFailure) and result.reason == "transient"
    assert "within 2 s" in result.message, result.message
    assert elapsed < 8  # the body alone takes over 15 s to arrive


class _Gathering:
    """A server that holds each request until `wanted` are out at once (or 10 s have
    passed), then answers it; `most_at_once` is the most it saw out together."""

    def __init__(self, wanted: int):
        import http.server
        import json
        import threading

        gathering = self
        self.most_at_once, self._out = 0, 0
        self._changed = threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with gathering._changed:
                    gathering._out += 1
                    gathering.most_at_once = max(gathering.most_at_once, gathering._out)
                    gathering._changed.notify_all()
                    gathering._changed.wait_for(lambda: gathering.most_at_once >= wanted,
                                                timeout=10)
                    gathering._out -= 1
                data = json.dumps(_answer_body(self.path, "ok", 1)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 2 * wanted  # the clients connect all at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("uri", ["openai:m@{url}/v1", "vertex:gemini-2.5-flash-lite"])
def test_a_client_sends_as_many_requests_at_once_as_max_concurrency_allows(uri, monkeypatch):
    """httpx's own pool holds 100 connections: a client handed our transport took its
    pool, so requests past 100 waited inside httpx, counted as sent."""
    monkeypatch.setenv("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    wanted = 120
    gathering = _Gathering(wanted)
    try:
        config = ModelConfig(uri=uri.format(url=gathering.url), max_concurrency=wanted,
                             concurrency="fixed",
                             max_retries=0, project="p", location="us-central1",
                             base_url=None if uri.startswith("openai") else gathering.url)
        results = ModelClient(config).call_all(
            [request(f"question {i}") for i in range(wanted)])
    finally:
        gathering.server.shutdown()
    assert all(isinstance(r, ModelResponse) for r in results), results[:1]
    assert gathering.most_at_once == wanted
