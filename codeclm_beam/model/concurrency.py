"""How many requests to one model may be in flight at once in this worker process.

    fixed:     --max_concurrency, always.
    adaptive:  starts at INITIAL, grows while answers come back clean, is cut by
               DECREASE on the service's signs of overload (429, 408 and timeouts,
               5xx): AIMD, as TCP does, never above --max_concurrency.

Adaptive is the default because most users cannot type their capacity in: Vertex AI's
Standard PayGo has a dynamic shared quota (no fixed RPM to give), a self-hosted vLLM's
capacity depends on its GPUs and prompt lengths. A quota the user did give still holds
(`ratelimit`): the limit here only decides how much of it is used at once. Where one
is given, the limit starts at the ceiling instead of INITIAL: the user has vouched for
the capacity and the rate limiter paces to it, so probing up from INITIAL would only
idle the first round trips of every worker; an overload still cuts it as anywhere.

One limit per model identity and process, taken by every stage of that process, so the
stages of a round never each probe the service on their own. It is not shared across
the processes of a VM: AIMD controllers that share one bottleneck converge to a fair
share of it (Chiu and Jain, 1989), which keeps the cost of a request to one lock.

Why not a library: Beam's `AdaptiveThrottler` rejects requests client-side at a rate
that lets about half of them fail at the server (its overload ratio of 2), and no
maintained Python package has an AIMD concurrency limit; the controller is the few
lines below.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Optional

from codeclm_beam.model.errors import RETRYABLE_HTTP_STATUSES
from codeclm_beam.model.errors import TransientModelError

FIXED, ADAPTIVE = "fixed", "adaptive"
CONCURRENCY_MODES = (ADAPTIVE, FIXED)

# What a request's outcome says about the service's capacity.
CLEAN, OVERLOADED, NEUTRAL = "clean", "overloaded", "neutral"


def outcome_of(error: Optional[BaseException]) -> str:
    """CLEAN for an answer; OVERLOADED for a 429, a timeout or a 5xx (a transient
    error without a status is a timeout or a dropped connection); NEUTRAL for an
    error that says nothing about load (a refusal, a bad request)."""
    if error is None:
        return CLEAN
    if isinstance(error, TransientModelError) and (
            error.status is None or error.status in RETRYABLE_HTTP_STATUSES):
        return OVERLOADED
    return NEUTRAL


@dataclasses.dataclass(frozen=True)
class Ticket:
    """One request's slot, and when it was taken."""

    sent_at: float


class ConcurrencyLimit:
    """Requests in flight at once, adjusted once a round trip unless `adaptive` is
    False.

    Multiplicative decrease: an overload multiplies the limit by DECREASE and
    remembers where it was (the last known capacity), once per overload: answers to
    requests sent before the last cut were sent under the old limit and do not cut
    again. Additive increase, paced by that memory (BIC, Xu et al. 2004): below the
    last known capacity the limit climbs half the way to it each round trip (fast
    when far below, careful near it, so a cycle sends many requests per 429); past it,
    it probes in steps that double each clean round trip, at most a tenth of the
    limit (or one request, if more), so a capacity that grew is found in a few round trips; and since each probe
    that fails costs a 429, after each failed probe it holds at the last capacity
    twice as long before the next (up to MAX_PATIENCE round trips). Before the first
    overload, and again once past RESTART times the last capacity (it has moved
    altogether), it doubles each round trip (slow start). A round trip is `limit` clean
    answers (at least MIN_ROUND), and only answers while the limit is full count.
    """

    INITIAL = 8
    DECREASE = 0.5
    # The smallest step per round trip (near the last known capacity, and the first
    # probe past it), in requests.
    MIN_STEP = 0.25
    # Clean answers in a round at least: at a limit of 2, a round trip's 2 answers are
    # too few to tell a step was safe.
    MIN_ROUND = 4
    # Round trips held at the last known capacity before probing past it: doubled by
    # each probe that fails (each costs a 429), back to 1 when one succeeds.
    MAX_PATIENCE = 4
    # Changes of the limit kept in `history` (a few hours of a busy worker's).
    HISTORY_KEPT = 10_000
    # The largest probe step, as a share of the limit; but a whole request at least: at
    # a small limit a share alone crawls (a capacity that grew from 200 to 900 RPM took
    # 15 s of the bench's 900 RPM phase to find, 0.73 of it answered).
    MAX_PROBE = 0.1
    # Past this many times the last known capacity, back to slow start.
    RESTART = 1.75

    def __init__(self, ceiling: int, adaptive: bool = True, clock=time.monotonic,
                 initial: Optional[int] = None):
        """`initial`: where an adaptive limit starts (INITIAL by default)."""
        if ceiling < 1:
            raise ValueError("the concurrency ceiling must be at least 1")
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._clock = clock
        start = self.INITIAL if initial is None else initial
        self._limit = float(min(start, ceiling) if adaptive else ceiling)
        self._in_flight = 0
        self._waiting = 0
        self._last_capacity: Optional[float] = None  # None: slow start
        self._probe = self.MIN_STEP
        self._clean_in_round = 0
        self._patience, self._held = 1, 0
        self._last_cut = float("-inf")
        self._free = threading.Condition()
        # (time, limit) at each change, for benchmarks and the run's log; the newest
        # HISTORY_KEPT only, as a worker on Dataflow runs for days.
        self.history: collections.deque = collections.deque(
            [(clock(), self._limit)], maxlen=self.HISTORY_KEPT)

    @property
    def limit(self) -> int:
        return max(1, math.floor(self._limit + 0.5))

    def acquire(self) -> Ticket:
        with self._free:
            self._waiting += 1
            while self._in_flight >= self.limit:
                self._free.wait()
            self._waiting -= 1
            self._in_flight += 1
            return Ticket(self._clock())

    def release(self, ticket: Ticket, outcome: str) -> None:
        with self._free:
            # Only a full limit is tested by an answer: a sender that leaves slots
            # free proves nothing about a larger one.
            limit_bound = self._waiting > 0 or self._in_flight >= self.limit
            self._in_flight -= 1
            if self.adaptive:
                before = self.limit
                self._adjust(ticket, outcome, limit_bound)
                if self.limit != before:
                    self.history.append((self._clock(), self._limit))
            self._free.notify_all()

    def _adjust(self, ticket: Ticket, outcome: str, limit_bound: bool) -> None:
        if outcome == OVERLOADED and ticket.sent_at > self._last_cut:
            if self._last_capacity is None:
                # Slow start doubled the limit each round trip: half of it was clean
                # a round trip ago, so the capacity lies between the two.
                self._last_capacity = self._limit * 0.75
                self._limit = max(1.0, self._limit / 2)
            else:
                probing = self._limit >= self._last_capacity
                if probing:
                    # A probe failed: the capacity has not grown, so wait longer
                    # before the next one (each costs a 429).
                    self._patience = min(self.MAX_PATIENCE, 2 * self._patience)
                # Past the last known capacity, the new one lies between it and the
                # limit that failed; below it, the capacity itself fell, so climb
                # back less far (BIC's fast convergence).
                self._last_capacity = (
                    (self._last_capacity + self._limit) / 2 if probing
                    else self._limit * (1 + self.DECREASE) / 2)
                self._limit = max(1.0, self._limit * self.DECREASE)
            self._last_cut = self._clock()
            self._probe, self._clean_in_round, self._held = self.MIN_STEP, 0, 0
            return
        if outcome != CLEAN or not limit_bound:
            return
        if self._last_capacity is None:  # slow start: +1 an answer
            self._limit = min(float(self.ceiling), self._limit + 1.0)
            return
        self._clean_in_round += 1
        if self._clean_in_round < max(self.limit, self.MIN_ROUND):
            return
        self._clean_in_round = 0
        if self._limit < self._last_capacity:
            step = max(self.MIN_STEP, (self._last_capacity - self._limit) / 2)
        elif self._held < self._patience:
            self._held += 1
            return
        else:
            if self._limit >= self._last_capacity + 1:
                self._patience = 1  # a whole request past it answered clean: it grew
            if self._limit >= self.RESTART * self._last_capacity:
                # Far past it: the capacity is somewhere else altogether (a quota
                # raised, a service scaled up); find it as at the start.
                self._last_capacity = None
                return
            step = min(self._probe, max(1.0, self._limit * self.MAX_PROBE))
            self._probe *= 2
        self._limit = min(float(self.ceiling), self._limit + step)


_LIMITS: dict[tuple, ConcurrencyLimit] = {}
_LIMITS_LOCK = threading.Lock()


def shared_limit(model_id: str, ceiling: int, mode: str,
                 quota_given: bool = False) -> ConcurrencyLimit:
    """The process's one limit for a model, whichever stage asks; adaptive, it starts
    at the ceiling where the user gave the model a quota (see the module)."""
    if mode not in CONCURRENCY_MODES:
        raise ValueError(f"concurrency {mode!r}: one of {', '.join(CONCURRENCY_MODES)}")
    with _LIMITS_LOCK:
        key = (model_id, ceiling, mode, quota_given)
        if key not in _LIMITS:
            _LIMITS[key] = ConcurrencyLimit(ceiling, adaptive=mode == ADAPTIVE,
                                            initial=ceiling if quota_given else None)
        return _LIMITS[key]
