"""Quotas: the token bucket alone, through the model layer, and shared by the two worker
processes of the multi-processing DirectRunner."""
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import CodecLMModelHandler
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import QuotaConfig
from codeclm_beam.model import MinuteQuota
from tests.scripted_backend import read_calls
from tests.scripted_backend import write_scenario


def assert_windows_within(times, limit, window_s, slack=0.05):
    """No window of `window_s` seconds holds more than `limit` of the sorted times."""
    times = sorted(times)
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s + slack:
            j += 1
        assert i - j + 1 <= limit, (i, t - times[0], i - j + 1)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_cold_start_goes_out_at_once_up_to_the_minute():
    clock = FakeClock()
    quota = MinuteQuota(requests_per_minute=600, tokens_per_minute=None, clock=clock)
    waits = [quota.reserve(1) for _ in range(1200)]
    assert waits[:600] == [0.0] * 600
    # Each waits for its booking a minute (and 1% for the way to the server) before.
    assert waits[600:] == [pytest.approx(60.6)] * 600
    clock.now = 61.0
    assert quota.reserve(1) == pytest.approx(60.2)  # 60.6 s to 121.2 s is full


def test_no_sixty_second_window_exceeds_the_quota():
    """A server counting requests over any 60 s window never sees more than the limit,
    however greedy the callers."""
    for limit in (60, 600, 5000):
        clock = FakeClock()
        quota = MinuteQuota(limit, None, clock=clock)
        sent = []
        for _ in range(3 * limit):
            wait = quota.reserve(1)
            sent.append(clock.now + wait)
            clock.now += wait / 2 + 0.001  # callers arrive faster than let through
        assert_windows_within(sent, limit, 60.0, slack=1e-6)
        # ...and it uses the quota: three minutes' worth in a little over two (the
        # callers' own 1 ms steps spread the first minute, and 1% of margin a window).
        assert sent[-1] - sent[0] <= 121.2 + limit * 0.001 + 1e-6


def test_token_quota_counts_tokens_not_requests():
    clock = FakeClock()
    quota = MinuteQuota(requests_per_minute=None, tokens_per_minute=6000, clock=clock)
    assert quota.reserve(1, tokens=5000) == 0.0
    assert quota.reserve(1, tokens=2000) == pytest.approx(60.6)  # 7000 > 6000
    clock.now = 10.0
    quota.charge_tokens(-1000)  # the last prompt was smaller than estimated
    quota.charge_tokens(5000)   # completion tokens learnt after the call
    assert quota.reserve(1, tokens=1) == pytest.approx(111.2)


def make_requests(n, tag=""):
    return [ModelRequest.create(f"q{tag}{i}", [ChatMessage("user", f"question {tag}{i}")])
            for i in range(n)]


def test_model_layer_waits_for_quota(tmp_path):
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"))
    config = ModelConfig(uri=uri, max_concurrency=8, quota=QuotaConfig(
        requests_per_minute=600, window_s=3.0, run_id=uuid.uuid4().hex))  # 30 per 3 s
    client = ModelClient(config)
    started = time.monotonic()
    results = client.call_all(make_requests(45))
    elapsed = time.monotonic() - started
    assert all(r.text for r in results)
    assert elapsed >= 3.0 - 0.05  # 30 at once, the other 15 after the window
    assert_windows_within([c["time"] for c in read_calls(tmp_path / "log")], 30, 3.0)
    assert sum(r.stats.throttled_seconds for r in results) > 15  # 15 waited


@pytest.mark.timeout(180)
def test_many_concurrent_callers_share_the_quota_and_finish(tmp_path):
    """Sixty-four threads at once through the VM's shared quota: the run ends (it hung
    when each thread opened its own connection to the quota's server)."""
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"),
                         latency_s=0.01)
    config = ModelConfig(uri=uri, max_concurrency=64, quota=QuotaConfig(
        requests_per_minute=100_000, run_id=uuid.uuid4().hex))
    results = ModelClient(config).call_all(make_requests(320))
    assert len(results) == 320 and all(r.text for r in results)
    assert len(read_calls(tmp_path / "log")) == 320


def test_quota_holds_across_two_worker_processes(tmp_path):
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"),
                         latency_s=0.01)
    config = ModelConfig(uri=uri, max_concurrency=4, quota=QuotaConfig(
        requests_per_minute=1200, window_s=2.0, run_id=uuid.uuid4().hex))  # 40 per 2 s
    options = PipelineOptions(direct_num_workers=2,
                              direct_running_mode="multi_processing")
    requests = make_requests(100)
    with beam.Pipeline(options=options) as p:
        ids = (p | beam.Create(requests) | beam.Reshuffle()
               | RunInference(CodecLMModelHandler(config, "quota"))
               | beam.Map(lambda pr: pr.example.request_id))
        assert_that(ids, equal_to([r.request_id for r in requests]))
    calls = read_calls(tmp_path / "log")
    assert len(calls) == 100
    assert len({c["pid"] for c in calls}) == 2, "both worker processes sent requests"
    assert_windows_within([c["time"] for c in calls], 40, 2.0)
    span = max(c["time"] for c in calls) - min(c["time"] for c in calls)
    assert span >= 4.0 - 0.05  # 40, then 40 two seconds later, then 20
