"""A stage's model counters, and the throttled time Dataflow's autoscaler reads."""
from __future__ import annotations

import math
from typing import Iterable

from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler

from codeclm_beam import metrics
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelResult


class StageMetrics:
    """Beam counters for one stage and model. Updated only from the bundle thread:
    Beam drops metric updates made from helper threads."""

    def __init__(self, stage: str, model_id: str):
        namespace = metrics.model_namespace(stage, model_id)
        self._counters = {name: metrics.Counter(namespace, name)
                          for name in metrics.MODEL_COUNTERS}
        self._signaler = ThrottlingSignaler(namespace)
        self._throttled_carry = 0.0

    def record(self, results: Iterable[ModelResult], final: bool = True) -> None:
        """Counts results; `final=False` counts their requests and tokens only (an
        element whose answer is counted elsewhere)."""
        totals = dict.fromkeys(metrics.MODEL_COUNTERS, 0)
        throttled = 0.0
        for result in results:
            stats = result.stats
            totals["elements"] += int(final)
            totals["requests"] += stats.attempts
            totals["cache_hits"] += int(stats.cache_hit)
            totals["retries"] += stats.retries
            totals["parse_retries"] += stats.parse_retries
            totals["truncation_retries"] += stats.truncation_retries
            totals["truncated"] += int(final and stats.truncated)
            totals["failures"] += int(final and isinstance(result, ModelFailure))
            for kind, tokens in stats.usage.as_dict().items():
                totals[kind] += tokens
            if stats.paid_before is not None:
                for name, value in stats.paid_before.as_dict().items():
                    totals[metrics.PAID_BEFORE[name]] += value
            throttled += stats.throttled_seconds
        totals["throttled_ms"] = int(throttled * 1000)
        for name, value in totals.items():
            if value:
                self._counters[name].inc(value)
        self._signal_throttled(throttled)

    def job_started(self) -> None:
        """A batch prediction job is being submitted, or a previous one resumed."""
        self._counters["batch_jobs"].inc()

    def job_ended(self, failed: bool) -> None:
        self._counters["batch_jobs_ended"].inc()
        if failed:
            self._counters["batch_jobs_failed"].inc()

    def waited(self, seconds: float) -> None:
        """Time spent waiting for a batch job: throttled time to Dataflow's
        autoscaler (waiting is no reason to add workers)."""
        if seconds:
            self._counters["batch_wait_ms"].inc(int(seconds * 1000))
            self._signal_throttled(seconds)

    def _signal_throttled(self, seconds: float) -> None:
        # Dataflow's autoscaler reads whole seconds; carry the fraction forward.
        self._throttled_carry += seconds
        whole = math.floor(self._throttled_carry)
        if whole:
            self._signaler.signal_throttled(whole)
            self._throttled_carry -= whole
