"""The error-share stop: a run whose model keeps failing stops instead of turning
every element into a dead letter."""
from __future__ import annotations

import collections
import threading
from typing import Optional

from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import ErrorShareExceeded
from codeclm_beam.model.errors import SERVICE_FAILURES
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelResult
from codeclm_beam.redact import redact


class ErrorShareGuard:
    """Per worker process and model: the outcomes of its last WINDOW calls. When more
    than the model's `max_error_share` of them failed at the service (after their
    retries), the next one raises ErrorShareExceeded, which fails the bundle and so
    the run (NeMo Data Designer's early shutdown, with a sliding window so an outage
    late in a long run stops it as fast as one at its start). Every answer so far is
    in the cache: the same command resumes once the cause is fixed."""

    # Online calls only: a batch job's outcome is one event for many requests.
    WINDOW = 20
    # Outcomes seen before any stop: a few failures of a small stage are dead letters.
    MINIMUM = 10

    def __init__(self):
        self._lock = threading.Lock()
        self._outcomes: dict[str, collections.deque] = {}
        self.stopped: Optional[str] = None  # why this process stopped a run

    def record(self, config: ModelConfig, result: ModelResult) -> None:
        failed = isinstance(result, ModelFailure) and result.reason in SERVICE_FAILURES
        with self._lock:
            outcomes = self._outcomes.setdefault(
                config.identity, collections.deque(maxlen=self.WINDOW))
            outcomes.append(result if failed else None)
            failures = [r for r in outcomes if r is not None]
            if (config.max_error_share >= 1 or len(outcomes) < self.MINIMUM
                    or len(failures) <= config.max_error_share * len(outcomes)):
                return
            last = failures[-1]
            self.stopped = (
                f"{len(failures)} of the last {len(outcomes)} calls to "
                f"{redact(config.uri)} failed after their retries (last: {last.reason}, "
                f"{last.message[:200]}), over --max_error_share "
                f"{config.max_error_share:g}; every answer so far is cached: fix the "
                "cause and run the same command to resume")
            outcomes.clear()
        raise ErrorShareExceeded(self.stopped)

    def reset(self) -> None:
        with self._lock:
            self._outcomes.clear()
            self.stopped = None


ERROR_SHARE = ErrorShareGuard()
