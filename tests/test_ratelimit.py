"""Quotas: the token bucket alone, through the model layer, and shared by the two worker
processes of the multi-processing DirectRunner."""
import time
import uuid

import apache_beam as beam
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
from codeclm_beam.model import TokenBucket
from tests.scripted_backend import read_calls
from tests.scripted_backend import write_scenario


def earliest_allowed(i, capacity, rate_per_s):
    """The earliest time (after the first call) the i-th call (0-based) may start."""
    return max(0.0, (i + 1 - capacity) / rate_per_s)


def assert_within_rate(times, capacity, rate_per_s, slack=0.05):
    times = sorted(times)
    for i, t in enumerate(times):
        assert t - times[0] >= earliest_allowed(i, capacity, rate_per_s) - slack, \
            (i, t - times[0])


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_bucket_reservations_follow_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(requests_per_minute=600, tokens_per_minute=None,
                         burst_seconds=1.0, clock=clock)  # capacity 10, 590/60 per s
    waits = [bucket.reserve(1) for _ in range(30)]
    assert waits[:10] == [0.0] * 10
    assert abs(waits[-1] - 20 / (590 / 60)) < 1e-9


def test_no_sixty_second_window_exceeds_the_quota():
    """A server counting requests over any 60 s window never sees more than the limit,
    however greedy the callers."""
    for limit in (60, 600, 5000):
        clock = FakeClock()
        bucket = TokenBucket(limit, None, burst_seconds=1.0, clock=clock)
        sent = []
        for _ in range(3 * limit):
            wait = bucket.reserve(1)
            sent.append(clock.now + wait)
            clock.now += wait / 2  # callers arrive faster than they are let through
        sent.sort()
        j = 0
        for i, t in enumerate(sent):
            while sent[j] <= t - 60:
                j += 1
            assert i - j + 1 <= limit, (limit, i - j + 1)
        # ...and it uses the quota: over three minutes, at least 95% of it.
        assert len(sent) / ((sent[-1] - sent[0]) / 60) >= 0.95 * limit


def test_token_quota_counts_tokens_not_requests():
    clock = FakeClock()
    bucket = TokenBucket(requests_per_minute=None, tokens_per_minute=6000,
                         burst_seconds=1.0, clock=clock)  # capacity 100, 5900/60 per s
    rate = 5900 / 60
    assert bucket.reserve(1, tokens=100) == 0.0
    assert abs(bucket.reserve(1, tokens=200) - 200 / rate) < 1e-9
    bucket.charge_tokens(100)  # completion tokens learnt after the call
    assert abs(bucket.reserve(1, tokens=1) - 301 / rate) < 1e-9


def make_requests(n, tag=""):
    return [ModelRequest.create(f"q{tag}{i}", [ChatMessage("user", f"question {tag}{i}")])
            for i in range(n)]


def test_model_layer_waits_for_quota(tmp_path):
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"))
    config = ModelConfig(uri=uri, max_concurrency=8, quota=QuotaConfig(
        requests_per_minute=600, run_id=uuid.uuid4().hex))
    client = ModelClient(config)
    started = time.monotonic()
    results = client.call_all(make_requests(30))
    elapsed = time.monotonic() - started
    assert all(r.text for r in results)
    assert elapsed >= 2.0 - 0.05  # 30 requests, 10 at once, then 10/s
    assert_within_rate([c["time"] for c in read_calls(tmp_path / "log")], 10, 10)
    assert sum(r.stats.throttled_seconds for r in results) > 5  # many waited


def test_quota_holds_across_two_worker_processes(tmp_path):
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"),
                         latency_s=0.01)
    config = ModelConfig(uri=uri, max_concurrency=4, quota=QuotaConfig(
        requests_per_minute=1200, run_id=uuid.uuid4().hex))  # 20/s, capacity 20
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
    assert_within_rate([c["time"] for c in calls], 20, 20)
    span = max(c["time"] for c in calls) - min(c["time"] for c in calls)
    assert span >= (100 - 20) / 20 - 0.05
