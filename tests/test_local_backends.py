"""The embedded llama.cpp backend and the OpenAI-compatible backend, against the real
SmolLM2-135M-Instruct model (in process, and behind the real llama_cpp.server)."""
import os
import apache_beam as beam
import pytest
import jsonschema
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import CodecLMModelHandler
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelFailure
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse

# The embedded llama.cpp model: the `local` extra (not in the compatibility pass).
pytestmark = pytest.mark.embedded

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
        # Enums, not numeric bounds: llama.cpp's grammar enforces the former only, and
        # the layer re-asks when an answer breaks what the grammar cannot enforce.
        "size": {"enum": ["small", "medium", "large"]},
        "population_millions": {"type": "integer"},
    },
    "required": ["city", "size", "population_millions"],
    "additionalProperties": False,
}


def city_request(i, seed=1):
    return ModelRequest.create(
        f"city-{i}",
        [ChatMessage("system", "Answer in JSON."),
         ChatMessage("user", f"Name a large city (number {i}) and its population "
                             "in millions.")],
        GenerationSettings(temperature=0.7, max_output_tokens=64, seed=seed), SCHEMA)


def test_embedded_model_answers_schema_valid_json():
    client = ModelClient(ModelConfig(uri="llamacpp:smollm2-135m"))
    results = client.call_all([city_request(i) for i in range(3)])
    for result in results:
        assert isinstance(result, ModelResponse), result
        jsonschema.validate(result.data, SCHEMA)
        assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
        assert result.stats.attempts == 1


def test_embedded_model_is_reproducible_with_a_seed():
    client = ModelClient(ModelConfig(uri="llamacpp:smollm2-135m"))
    first = client.call(city_request(0, seed=42))
    client.call(city_request(1, seed=7))  # other work in between must not matter
    again = client.call(city_request(0, seed=42))
    assert first.text == again.text


def test_openai_compatible_backend_against_llama_cpp_server(llama_server):
    config = ModelConfig(uri=f"openai:smollm2@{llama_server}", max_concurrency=2)
    with TestPipeline() as p:
        results = (p | beam.Create([city_request(i) for i in range(4)])
                   | RunInference(CodecLMModelHandler(config, "openai-contract")))

        def check(predictions):
            assert len(predictions) == 4
            for prediction in predictions:
                result = prediction.inference
                assert isinstance(result, ModelResponse), result
                jsonschema.validate(result.data, SCHEMA)
                assert result.usage.completion_tokens > 0
        assert_that(results, check)


def test_openai_compatible_free_text(llama_server):
    client = ModelClient(ModelConfig(uri=f"openai:smollm2@{llama_server}"))

    def ask(max_output_tokens):
        return client.call(ModelRequest.create(
            "t", [ChatMessage("user", "Say hello in French.")],
            GenerationSettings(temperature=0.0, max_output_tokens=max_output_tokens)))

    result = ask(512)
    assert isinstance(result, ModelResponse), result
    assert result.data is None and result.text.strip()
    assert result.finish_reason == "stop"
    # Cut at the limit by the real server (finish reason "length"): re-sent once with
    # twice the room, re-asked with other seeds, then a truncated failure, never a
    # short answer kept as complete.
    cut = ask(2)
    assert isinstance(cut, ModelFailure), cut
    assert (cut.reason, cut.finish_reason) == ("truncated", "length")
    assert cut.stats.truncation_retries == 1 and cut.stats.parse_retries == 2
    assert cut.stats.attempts == 4


def test_the_embedded_model_decodes_on_the_idle_cpus_unless_told(monkeypatch):
    from codeclm_beam.model.backends import llamacpp
    monkeypatch.delenv(llamacpp.THREADS_ENV, raising=False)
    cpus = len(os.sched_getaffinity(0))
    # Measured for real: a number of CPUs between none and all of them.
    assert 0 <= llamacpp._idle_cpus() <= os.cpu_count() + 0.01
    # Another process keeps all but one CPU busy: one thread, none waiting on a
    # shared core.
    monkeypatch.setattr(llamacpp, "_idle_cpus", lambda: 1.1)
    assert llamacpp.embedded_threads() == 1
    monkeypatch.setattr(llamacpp, "_idle_cpus", lambda: 0.2)
    assert llamacpp.embedded_threads() == 1
    monkeypatch.setattr(llamacpp, "_idle_cpus", lambda: cpus + 0.0)
    assert llamacpp.embedded_threads() == cpus
    monkeypatch.setattr(llamacpp, "_idle_cpus", lambda: None)  # no /proc/stat
    assert llamacpp.embedded_threads() == cpus
    monkeypatch.setenv(llamacpp.THREADS_ENV, "3")
    assert llamacpp.embedded_threads() == 3
