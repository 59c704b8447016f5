"""Contract test: the vertex: backend against a loopback server that speaks Vertex AI's
`generateContent` REST protocol, driven through the real google-genai client and the
real Beam DirectRunner."""
import json
import re
import threading

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from google.oauth2.credentials import Credentials

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import CodecLMModelHandler
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelFailure
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse
from tests.loopback import RecordingServer

PATH = re.compile(r"^/v1beta1/projects/test-proj/locations/us-central1/publishers/"
                  r"google/models/gemini-test:generateContent$")
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}},
          "required": ["n"]}


def vertex_responder():
    throttled_once = set()
    lock = threading.Lock()

    def respond(method, path, body, headers):
        if not PATH.match(path):
            return 404, {"error": {"code": 404, "message": "no such path " + path,
                                   "status": "NOT_FOUND"}}, {}
        prompt = body["contents"][0]["parts"][0]["text"]
        if "BAD" in prompt:
            return 400, {"error": {"code": 400, "message": "Request contains an "
                                   "invalid argument.", "status": "INVALID_ARGUMENT"}}, {}
        with lock:
            first_time = prompt not in throttled_once
            throttled_once.add(prompt)
        if "THROTTLE" in prompt and first_time:
            return 429, {"error": {
                "code": 429, "message": "Resource exhausted.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": "1s"}]}}, {}
        n = int(prompt.split()[-1])
        return 200, {
            "candidates": [{"content": {"role": "model",
                                        "parts": [{"text": json.dumps({"n": n * 2})}]},
                            "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10 + n, "candidatesTokenCount": 3,
                              "totalTokenCount": 13 + n},
            "modelVersion": "gemini-test"}, {}

    return respond


def make_requests():
    requests = []
    for i in range(40):
        text = f"double {i}"
        if i == 7:
            text = f"BAD double {i}"
        if i == 11:
            text = f"THROTTLE double {i}"
        requests.append(ModelRequest.create(
            f"r{i}", [ChatMessage("system", "You double numbers."),
                      ChatMessage("user", text)],
            GenerationSettings(temperature=0.0, max_output_tokens=64, seed=i), SCHEMA))
    return requests


def test_vertex_generate_content_contract():
    server = RecordingServer(vertex_responder())
    with server.running():
        config = ModelConfig(
            uri="vertex:gemini-test", project="test-proj", location="us-central1",
            base_url=server.base_url, credentials=Credentials(token="fake-token"),
            max_concurrency=8, initial_backoff_s=0.01)
        with TestPipeline() as p:
            results = (p | beam.Create(make_requests())
                       | RunInference(CodecLMModelHandler(config, "contract")))

            def check(predictions):
                by_id = {pr.example.request_id: pr.inference for pr in predictions}
                assert len(by_id) == 40
                failures = {k: v for k, v in by_id.items() if isinstance(v, ModelFailure)}
                assert list(failures) == ["r7"], failures
                assert failures["r7"].error_class == "PermanentModelError"
                assert "400" in failures["r7"].message
                assert failures["r7"].attempts == 1
                for rid, res in by_id.items():
                    if rid == "r7":
                        continue
                    n = int(rid[1:])
                    assert isinstance(res, ModelResponse)
                    assert res.data == {"n": 2 * n}
                    assert res.usage.prompt_tokens == 10 + n and res.usage.completion_tokens == 3
                    assert res.finish_reason == "STOP"
                assert by_id["r11"].stats.retries == 1
                assert by_id["r11"].stats.attempts == 2

            assert_that(results, check)

    # One HTTP request per element, plus the one retry of the throttled element.
    assert len(server.requests) == 41
    prompts = [r["body"]["contents"][0]["parts"][0]["text"] for r in server.requests]
    assert sorted(set(prompts)) == sorted(r.messages[1].content for r in make_requests())
    for req in server.requests:
        config = req["body"]["generationConfig"]
        assert config["responseMimeType"] == "application/json"
        assert config["responseJsonSchema"] == SCHEMA
        assert req["body"]["systemInstruction"]["parts"][0]["text"] == \
            "You double numbers."
        assert req["headers"]["authorization"] == "Bearer fake-token"
