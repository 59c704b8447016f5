"""--concurrency adaptive: the AIMD limit on requests in flight per model and process."""
import itertools

import pytest

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import QuotaConfig
from codeclm_beam.model.concurrency import CLEAN
from codeclm_beam.model.concurrency import NEUTRAL
from codeclm_beam.model.concurrency import OVERLOADED
from codeclm_beam.model.concurrency import ConcurrencyLimit
from codeclm_beam.model.concurrency import outcome_of
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.errors import TransientModelError


def _limit(ceiling=64, adaptive=True):
    ticks = itertools.count()
    return ConcurrencyLimit(ceiling, adaptive, clock=lambda: float(next(ticks)))


class Sender:
    """A sender with more requests than the limit allows: every slot freed is taken
    again at once, as waiting pool threads take it."""

    def __init__(self, limit):
        self.limit, self.in_flight = limit, []
        self.refill()

    def refill(self):
        while len(self.in_flight) < self.limit.limit:
            self.in_flight.append(self.limit.acquire())

    def answer(self, outcome=CLEAN):
        self.limit.release(self.in_flight.pop(0), outcome)
        self.refill()

    def round_trip(self):
        for _ in range(max(self.limit.limit, ConcurrencyLimit.MIN_ROUND)):
            self.answer()


def test_slow_start_doubles_each_round_trip_up_to_the_ceiling_only():
    initial = ConcurrencyLimit.INITIAL
    limit = _limit(ceiling=4 * initial + 2)
    sender = Sender(limit)
    assert limit.limit == initial
    seen = []
    for _ in range(4):
        for _ in range(limit.limit):  # one round trip: every request in flight answered
            sender.answer()
        seen.append(limit.limit)
    assert seen == [2 * initial, 4 * initial, 4 * initial + 2, 4 * initial + 2]


def test_a_sender_that_never_fills_the_limit_does_not_grow_it():
    limit = _limit()
    for _ in range(50):
        limit.release(limit.acquire(), CLEAN)  # one in flight of INITIAL allowed
    assert limit.limit == ConcurrencyLimit.INITIAL


def _slow_start_then_one_overload(limit, sender):
    """Half a round trip clean in slow start (+1 an answer): the limit it reached."""
    for _ in range(ConcurrencyLimit.INITIAL // 2):
        sender.answer()
    reached = limit.limit
    assert reached == ConcurrencyLimit.INITIAL + ConcurrencyLimit.INITIAL // 2
    return reached


def test_one_overload_cuts_once_and_what_was_sent_before_the_cut_does_not_cut_again():
    limit = _limit()
    sender = Sender(limit)
    reached = _slow_start_then_one_overload(limit, sender)
    before_the_cut = list(sender.in_flight)
    limit.release(before_the_cut[0], OVERLOADED)  # slow start ends: half the limit
    assert limit.limit == reached // 2
    for ticket in before_the_cut[1:]:  # the same overload, answered later
        limit.release(ticket, OVERLOADED)
    assert limit.limit == reached // 2
    limit.release(limit.acquire(), OVERLOADED)  # sent after the cut: a new overload
    assert limit.limit == round(reached / 2 * ConcurrencyLimit.DECREASE)


def test_after_a_cut_the_limit_climbs_back_towards_the_last_capacity_then_probes():
    limit = _limit()
    sender = Sender(limit)
    reached = _slow_start_then_one_overload(limit, sender)
    sender.answer(OVERLOADED)  # back to half, the capacity guessed at 3/4 of it
    capacity = 0.75 * reached
    seen = [limit._limit]
    # Until it is far enough past the capacity to be back in slow start.
    while seen[-1] < ConcurrencyLimit.RESTART * capacity and len(seen) < 100:
        sender.round_trip()
        seen.append(limit._limit)
    steps = [b - a for a, b in zip(seen, seen[1:])]
    assert steps[0] > steps[1] > steps[2] > 0  # halfway to it each round trip
    crossed = next(i for i, value in enumerate(seen) if value >= capacity)
    # At the last known capacity it holds one round trip (its patience), then probes
    # in steps that grow.
    assert steps[crossed] == 0 and all(step > 0 for step in steps[crossed + 1:])
    assert steps[-1] > steps[crossed + 1] and seen[-1] > capacity + 4
    assert limit._last_capacity is not None  # still probing, not restarted yet


def test_each_failed_probe_doubles_the_wait_before_the_next():
    limit = _limit()
    sender = Sender(limit)
    _slow_start_then_one_overload(limit, sender)
    sender.answer(OVERLOADED)

    def held_rounds_before_a_probe():
        held = 0
        for _ in range(100):
            before = limit._limit
            sender.round_trip()
            if limit._limit > before and before >= limit._last_capacity:
                return held
            held += limit._limit == before
        pytest.fail("no probe past the last capacity in 100 clean round trips")

    waits = []
    for _ in range(3):
        waits.append(held_rounds_before_a_probe())
        sender.answer(OVERLOADED)  # the probe fails
    assert waits == [min(wait, ConcurrencyLimit.MAX_PATIENCE) for wait in (1, 2, 4)]


def test_far_past_the_last_capacity_it_is_back_in_slow_start():
    limit = _limit(ceiling=1000)
    sender = Sender(limit)
    _slow_start_then_one_overload(limit, sender)
    sender.answer(OVERLOADED)
    capacity = limit._last_capacity
    for _ in range(100):  # probing, clean: the capacity grew
        if limit._limit >= ConcurrencyLimit.RESTART * capacity:
            break
        sender.round_trip()
    sender.round_trip()  # the round trip that ends there
    before = limit.limit
    for _ in range(3):
        sender.answer()
    assert limit.limit == before + 3  # +1 an answer: doubling each round trip again


@pytest.mark.parametrize("error,outcome", [
    (None, CLEAN),
    (TransientModelError("quota exceeded", status=429), OVERLOADED),
    (TransientModelError("request timeout", status=408), OVERLOADED),
    (TransientModelError("unavailable", status=503), OVERLOADED),
    (TransientModelError("ReadTimeout: timed out"), OVERLOADED),  # no status: no answer
    (PermanentModelError("bad request", status=400), NEUTRAL),
    (PermanentModelError("permission denied", status=403), NEUTRAL),
])
def test_429s_timeouts_and_5xx_are_overloads_and_a_refusal_says_nothing_of_load(
        error, outcome):
    assert outcome_of(error) == outcome


def test_an_error_that_says_nothing_of_load_leaves_the_limit_where_it_is():
    limit = _limit()
    sender = Sender(limit)
    reached = _slow_start_then_one_overload(limit, sender)
    for _ in range(3 * reached):
        sender.answer(NEUTRAL)
    assert limit.limit == reached


def test_fixed_concurrency_never_moves():
    limit = _limit(ceiling=5, adaptive=False)
    sender = Sender(limit)
    for outcome in (CLEAN, OVERLOADED) * 10:
        sender.answer(outcome)
    assert limit.limit == 5 and list(limit.history) == [limit.history[0]]


def test_the_history_of_the_limit_keeps_only_its_newest_changes(monkeypatch):
    # A worker on Dataflow runs for days: the limit's log of changes must not grow
    # with every overload and recovery.
    monkeypatch.setattr(ConcurrencyLimit, "HISTORY_KEPT", 6)
    limit = _limit(ceiling=64)
    sender = Sender(limit)
    for _ in range(40):
        sender.answer(OVERLOADED)
        for _ in range(8):
            sender.answer(CLEAN)
    assert len(limit.history) == 6
    assert [t for t, _ in limit.history] == sorted(t for t, _ in limit.history)
    assert limit.history[-1][1] == limit._limit


def test_with_a_quota_given_it_starts_at_the_ceiling_and_an_overload_still_cuts_it():
    url = "http://127.0.0.1:9/v1"  # never asked: the limits are made with the client
    vouched = ModelClient(ModelConfig(uri=f"openai:vouched@{url}", max_concurrency=40,
                                      quota=QuotaConfig(requests_per_minute=600)))
    unknown = ModelClient(ModelConfig(uri=f"openai:unknown@{url}", max_concurrency=40))
    assert vouched.in_flight.limit == 40
    assert unknown.in_flight.limit == ConcurrencyLimit.INITIAL
    limit = ConcurrencyLimit(40, initial=40)
    sender = Sender(limit)
    sender.answer(OVERLOADED)
    assert limit.limit == 40 * ConcurrencyLimit.DECREASE


def test_against_a_server_with_little_capacity_the_limit_comes_down_and_nothing_is_lost():
    # 300 requests a minute at 0.2 s each: one request in flight is all it takes.
    with FakeModelServer(ServerConfig(capacity_schedule=((0.0, 300.0),),
                                      latency_mean=0.2, latency_sigma=0.1)) as server:
        config = ModelConfig(uri=f"openai:m@{server.base_url}/v1", max_concurrency=16,
                             initial_backoff_s=0.2, max_backoff_s=1.0)
        client = ModelClient(config)
        results = client.call_all([
            ModelRequest.create(f"r{i}", [ChatMessage("user", f"Question {i}?")],
                                GenerationSettings(0.7, 256, seed=i)) for i in range(24)])
        outcomes = server.outcomes()
    assert all(hasattr(r, "text") for r in results), "every element answered"
    assert outcomes["ok"] == 24 and outcomes["throttled"] >= 1
    peak = max(value for _, value in client.in_flight.history)
    assert client.in_flight.limit < peak and client.in_flight.limit <= 4
    # Waiting for a slot is throttled time, which Dataflow's autoscaler is told of.
    assert sum(r.stats.throttled_seconds for r in results) > 0


@pytest.mark.parametrize("text,modes", [
    ("batch", {"strong": "batch", "target": "batch", "judge": "batch"}),
    ("judge=batch", {"strong": "online", "target": "online", "judge": "batch"}),
    ("flex,judge=batch", {"strong": "flex", "target": "flex", "judge": "batch"}),
])
def test_vertex_mode_per_role(text, modes):
    from codeclm_beam.model.config import parse_vertex_modes
    assert parse_vertex_modes(text) == modes


@pytest.mark.parametrize("text", ["fast", "critic=batch", "judge=slow"])
def test_a_vertex_mode_that_names_no_role_or_mode_is_refused(text):
    from codeclm_beam.model.config import parse_vertex_modes
    from codeclm_beam.model.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="ROLE=MODE"):
        parse_vertex_modes(text)
