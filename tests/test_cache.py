"""The response cache: a re-run sends nothing it already has an answer for, including
after a run that was killed midway, and --no_cache turns it off."""
import os
import signal
import subprocess
import sys
import textwrap

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.util import assert_that

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import CodecLMModelHandler
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse
from tests.scripted_backend import read_calls
from tests.scripted_backend import write_scenario

SCHEMA = {"type": "object", "properties": {"use_case": {"type": "string"},
                                           "skills": {"type": "array", "maxItems": 2}}}


def requests(n):
    return [ModelRequest.create(
        f"r{i}", [ChatMessage("user", f"Instruction:\nwrite poem {i} about rivers"
                                      "\n\nGive exactly one")],
        GenerationSettings(seed=i), SCHEMA) for i in range(n)]


def run(config, n):
    with beam.Pipeline() as p:
        out = (p | beam.Create(requests(n))
               | RunInference(CodecLMModelHandler(config, "cache-test")))

        def check(predictions):
            assert all(isinstance(pr.inference, ModelResponse) for pr in predictions)
            assert len(predictions) == n
        assert_that(out, check)


def test_second_run_makes_no_backend_call(tmp_path):
    uri = write_scenario(tmp_path / "s.json", log_dir=str(tmp_path / "log"))
    config = ModelConfig(uri=uri, cache_dir=str(tmp_path / "cache"))
    run(config, 12)
    assert len(read_calls(tmp_path / "log")) == 12
    run(config, 12)
    assert len(read_calls(tmp_path / "log")) == 12  # all twelve answered from cache
    run(config, 15)
    calls = read_calls(tmp_path / "log")
    assert len(calls) == 15 and {c["id"] for c in calls[12:]} == {"r12", "r13", "r14"}


def test_no_cache_sends_every_time(tmp_path):
    uri = write_scenario(tmp_path / "s.json", log_dir=str(tmp_path / "log"))
    config = ModelConfig(uri=uri, cache_dir=None)
    run(config, 5)
    run(config, 5)
    assert len(read_calls(tmp_path / "log")) == 10


KILLED_RUN = textwrap.dedent("""
    import sys
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from codeclm_beam.model import CodecLMModelHandler, ModelConfig
    from tests.test_cache import requests
    config = ModelConfig(uri=sys.argv[1], cache_dir=sys.argv[2], max_concurrency=1)
    with beam.Pipeline() as p:
        (p | beam.Create(requests(int(sys.argv[3])))
           | RunInference(CodecLMModelHandler(config, "cache-test")))
""")


def test_run_killed_midway_resumes_without_repeating_calls(tmp_path):
    log_dir = tmp_path / "log"
    uri = write_scenario(tmp_path / "s.json", log_dir=str(log_dir), latency_s=0.2)
    cache_dir = str(tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, uri, cache_dir, "40"],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    # Wait until some, not all, requests were sent, then kill without warning.
    import time
    deadline = time.time() + 120
    while len(read_calls(log_dir) if log_dir.exists() else []) < 8:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_calls(log_dir)
    assert 8 <= len(before) < 40
    # A call completed before the kill is one whose answer reached the cache.
    completed = {c["key"] for c in before[:-1]}

    config = ModelConfig(uri=uri, cache_dir=cache_dir)
    run(config, 40)
    after = read_calls(log_dir)[len(before):]
    assert not completed & {c["key"] for c in after}, "a completed call was repeated"
    assert len(before) - 1 + len(after) <= 40 + 1
    assert {c["id"] for c in before[:-1]} | {c["id"] for c in after} == \
        {f"r{i}" for i in range(40)}
