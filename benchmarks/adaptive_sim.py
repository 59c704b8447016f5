"""The adaptive concurrency limit against a simulated server, on a simulated clock: the
spread of `make bench`'s adaptive figures over many seeds in seconds, which one
three-minute run of the real step cannot show. How ConcurrencyLimit's constants were
chosen; the real step (benchmarks/run.py adaptive) is what the targets are read from.

    python benchmarks/adaptive_sim.py            # 80 seeds, the constants as shipped
    python benchmarks/adaptive_sim.py '{"DECREASE": 0.7}'   # one constant changed

The simulated server is the loopback server's capacity model (a token bucket holding
`burst` seconds of a rate that follows the schedule, 429 at once when empty) with
lognormal latency; the client is ModelClient's: 64 threads, each request takes a slot
of the real ConcurrencyLimit, a 429 releases it and is retried after full-jitter
exponential backoff from 1 s.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from codeclm_beam.model.concurrency import CLEAN  # noqa: E402
from codeclm_beam.model.concurrency import OVERLOADED  # noqa: E402
from codeclm_beam.model.concurrency import ConcurrencyLimit  # noqa: E402

SCHEDULE_RPM = (600.0, 200.0, 900.0)


def simulate(seed: int, constants: dict, phase_s: float = 60.0, burst_s: float = 2.0,
             threads: int = 64, latency_mean: float = 1.0, latency_sigma: float = 0.3):
    """One run: answers over capacity, share of 429s, answers over capacity by phase."""
    rng = random.Random(seed)
    now = 0.0
    limit = type("Tuned", (ConcurrencyLimit,), constants)(64, True, clock=lambda: now)
    schedule = tuple((i * phase_s, rpm) for i, rpm in enumerate(SCHEDULE_RPM))
    end = len(schedule) * phase_s
    n = int(1.1 * sum(rpm / 60 * phase_s for _, rpm in schedule))

    def rate_at(t):  # requests per second, as the loopback server reads its schedule
        return FakeModelServer.capacity_rpm_of(schedule, t) / 60
    bucket = {"tokens": rate_at(0) * burst_s, "at": 0.0}

    def admitted(t):
        rate = rate_at(t)
        bucket["tokens"] = min(rate * burst_s, bucket["tokens"] + rate * (t - bucket["at"]))
        bucket["at"] = t
        if bucket["tokens"] < 1:
            return False
        bucket["tokens"] -= 1
        return True

    mu = math.log(latency_mean) - 0.5 * math.log(1 + latency_sigma ** 2)
    sigma = math.sqrt(math.log(1 + latency_sigma ** 2))
    events: list = []
    order = 0
    waiting: list[int] = []  # threads waiting for a slot, by attempt number
    not_started, answered, busy_threads = n, 0, 0
    ok = [0] * int(end)
    throttled = [0] * int(end)

    def push(at, kind, data):
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, data))

    def send_what_fits():
        nonlocal not_started, busy_threads
        while busy_threads < threads and not_started:
            not_started -= 1
            busy_threads += 1
            waiting.append(1)
        while waiting and limit._in_flight < limit.limit:
            attempt = waiting.pop(0)
            limit._waiting = len(waiting)
            ticket = limit.acquire()
            if admitted(now):
                push(now + rng.lognormvariate(mu, sigma), "answer", (ticket, attempt, now))
            else:
                push(now + 0.005, "429", (ticket, attempt, now))
        limit._waiting = len(waiting)

    send_what_fits()
    while events and answered < n:
        now, _, kind, data = heapq.heappop(events)
        if kind == "retry":
            waiting.append(data)
        else:
            ticket, attempt, sent = data
            limit._waiting = len(waiting)
            limit.release(ticket, CLEAN if kind == "answer" else OVERLOADED)
            second = int(sent)
            if kind == "answer":
                answered += 1
                busy_threads -= 1
                if second < len(ok):
                    ok[second] += 1
            else:
                if second < len(throttled):
                    throttled[second] += 1
                push(now + rng.uniform(0, min(60.0, 2.0 ** (attempt - 1))), "retry",
                     attempt + 1)
        send_what_fits()
    capacity = sum(rpm / 60 * phase_s for _, rpm in schedule)
    return {"answers_over_capacity": sum(ok) / capacity,
            "share_429": sum(throttled) / (sum(throttled) + n),
            "by_phase": [sum(ok[int(at):int(at + phase_s)]) / (rpm / 60 * phase_s)
                         for at, rpm in schedule]}


def main() -> None:
    constants = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    runs = [simulate(seed, constants) for seed in range(80)]
    ratio = [r["answers_over_capacity"] for r in runs]
    share = [r["share_429"] for r in runs]
    print(json.dumps({
        "constants": constants or "as shipped", "seeds": len(runs),
        "answers_over_capacity_mean": round(statistics.mean(ratio), 3),
        "share_429_mean": round(statistics.mean(share), 4),
        "by_phase_mean": [round(statistics.mean(r["by_phase"][i] for r in runs), 3)
                          for i in range(len(SCHEDULE_RPM))],
        "runs_below_0.9": sum(x < 0.9 for x in ratio),
        "runs_at_or_over_2pc_429": sum(x >= 0.02 for x in share)}))


if __name__ == "__main__":
    main()
