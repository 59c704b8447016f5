"""A model step passes each answer on as it arrives: in a fused stage the next step asks
for an element while the step before still waits on a slow answer, and every element
keeps the window and timestamp it came with."""
import threading
import time

import apache_beam as beam
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from apache_beam.transforms import window

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model.calls import ModelCall
from tests.helpers import generate_args
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.loopback import RecordingServer
from tests.scripted_backend import read_calls

SLOW_S = 2.0


def chat_server(events: list):
    """An OpenAI-compatible server whose answer to a question holding "slow" takes
    SLOW_S; it notes when each request came and when each answer left."""
    lock = threading.Lock()

    def respond(method, path, body, headers):
        text = body["messages"][-1]["content"]
        with lock:
            events.append(("asked", body["model"], text, time.monotonic()))
        if "slow" in text:
            time.sleep(SLOW_S)
        with lock:
            events.append(("answered", body["model"], text, time.monotonic()))
        return 200, {"id": "x", "object": "chat.completion", "created": 0,
                     "model": body["model"], "choices": [{"index": 0, "finish_reason":
                     "stop", "message": {"role": "assistant", "content": f"re: {text}"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 3,
                               "total_tokens": 6}}, {}
    return RecordingServer(respond)


def ask(text: str) -> ModelRequest:
    return ModelRequest.create(text, [ChatMessage("user", text)], GenerationSettings(0.0, 16))


def test_the_next_step_asks_while_the_step_before_waits_on_its_slow_answer():
    events: list = []
    questions = {"slow question": 10, "quick one": 20, "quick two": 130}
    with chat_server(events).running() as server:
        first, second = (ModelConfig(f"openai:{name}@{server.base_url}/v1",
                                     max_concurrency=8) for name in ("first", "second"))
        with beam.Pipeline(runner="FnApiRunner") as p:
            answered = (
                p | beam.Create(list(questions.items()))
                | "Stamp" >> beam.Map(lambda kv: window.TimestampedValue(
                    (kv[0], ask(kv[0])), kv[1]))
                | beam.WindowInto(window.FixedWindows(60))
                | "First" >> ModelCall(first, "first")
                | "Again" >> beam.MapTuple(
                    lambda record, result: (record, ask(result.inference.text)))
                | "Second" >> ModelCall(second, "second")
                | "Texts" >> beam.MapTuple(lambda record, result: (
                    record, result.inference.text)))
            assert_that(answered, equal_to([
                ("slow question", "re: re: slow question"),
                ("quick one", "re: re: quick one"),
                ("quick two", "re: re: quick two")]))
            # Each answer in the window its question came in: the slow one, passed on
            # after the others, too.
            assert_that(answered | "Windows" >> beam.Map(
                lambda element, w=beam.DoFn.WindowParam: (element[0], w.start.micros)),
                equal_to([("slow question", 0), ("quick one", 0),
                          ("quick two", 120_000_000)]), label="InTheirWindows")
    slow_answered = next(t for kind, model, text, t in events
                         if (kind, model, text) == ("answered", "first", "slow question"))
    second_asked = sorted(t for kind, model, _, t in events
                          if (kind, model) == ("asked", "second"))
    assert len(second_asked) == 3
    # The quick questions' second step went out while the slow answer was still out.
    assert second_asked[1] < slow_answered - SLOW_S / 2, events


def test_decode_asks_while_rubrics_still_wait_on_their_answers(tmp_path):
    """Both read the pool and neither needs the other: decode takes the pool's size
    from where the pool is built, so the local runner runs both in one stage and a
    run waits for one tail, not a rubrics tail and then a decode tail."""
    latency_s = 0.5
    models = scripted_models(tmp_path, judge="strong_wins", latency_s=latency_s)
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    run_generate(generate_args(tmp_path, models, seeds, tmp_path / "out",
                               "--num_examples", "2", "--num_metadata", "4",
                               "--max_iterations", "1", "--quiet"))
    asked = {kind: sorted(call["time"] for call in read_calls(tmp_path / "calls")
                          if call["kind"] == kind) for kind in ("rubrics", "decode")}
    assert len(asked["rubrics"]) == len(asked["decode"]) >= 4
    # Before: the first decode call went out after the last rubrics answer came back.
    assert asked["decode"][0] < asked["rubrics"][-1] + latency_s, asked
