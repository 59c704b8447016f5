"""Every counter a run keeps, declared once, and the one reader of them.

Beam counters are the run's record: the manifest, `jobs status`, the live progress and
the CLI summary all read them through `RunCounters`, so a counter's name is spelled
only here (as `_MetricsCollector` does for RunInference in Beam's
`ml/inference/base.py`). Four namespaces:

    codeclm/flow                 where elements went: rows read, seeds, pool entries,
                                 round{n}.candidates/kept/..., examples, surplus
    codeclm/dead_letter          dead letters, one counter per stage
    codeclm/dedup                the buckets deduplication sent references into, and not
    codeclm/{stage}/{model id}   model calls: MODEL_COUNTERS

Each increment also goes to a process-local mirror (`LIVE`) that the live progress of
a local run reads while the pipeline runs: Beam's own metrics of a DirectRunner run
are only readable when it has finished. The worker processes of a multi-process local
run publish theirs to the launcher (`_Live`). The mirror counts attempts (a retried
bundle counts twice), so it drives the display only; the manifest reads committed
counters.
"""
from __future__ import annotations

import atexit
import collections
import glob
import json
import os
import threading
import time
from typing import Any, Iterable, NamedTuple, Optional

from apache_beam.metrics import Metrics

from codeclm_beam.model import types

PREFIX = "codeclm/"
FLOW = "codeclm/flow"
DEAD_LETTERS = "codeclm/dead_letter"
# Deduplication's references: the buckets each was sent into, and those it was not
# (no element there to compare it with).
DEDUP = "codeclm/dedup"
REFERENCE_BUCKETS_SENT = "reference_buckets_sent"
REFERENCE_BUCKETS_SKIPPED = "reference_buckets_skipped"

# Tokens as billed, named where `Usage` is.
TOKEN_KINDS = types.TOKEN_KINDS
# What an answer was paid with; a cache hit carries it as stored by the run that paid.
PAID = types.PAID_FIELDS
# Counted for cache hits: what earlier runs paid for the answers this run read.
PAID_BEFORE = {name: f"paid_before_{name}" for name in PAID}
MODEL_COUNTERS = ("requests", "cache_hits", "retries", "parse_retries",
                  "truncation_retries", "truncated", "failures", "throttled_ms",
                  *TOKEN_KINDS, *PAID_BEFORE.values(), "elements",
                  # --vertex_mode batch: jobs submitted or resumed, of which ended,
                  # of which ended failed, cancelled or expired; time spent waiting.
                  "batch_jobs", "batch_jobs_ended", "batch_jobs_failed", "batch_wait_ms")
# Counters kept in milliseconds, read as seconds.
_MILLISECONDS = {"throttled_ms": "throttled_seconds", "batch_wait_ms": "batch_wait_seconds"}

# Flow counters of the generate pipeline.
SEEDS = "seeds"
USER_METADATA = "user_metadata"
METADATA = "metadata"
METADATA_POOL = "metadata_pool"
RUBRIC_SETS = "rubric_sets"
BASIC_INSTRUCTIONS = "basic_instructions"
RESERVE_UNUSED = "reserve_unused"
SURPLUS = "surplus"
# Seeds (or metadata rows) a --preview run left out.
NOT_PREVIEWED = "not_previewed"
# Seeds left out of the seeded sample encoded (--max_seeds).
NOT_SAMPLED = "seeds.not_sampled"
EXAMPLES = "examples"
# What a round counts, as round{n}.{what}: "duplicate" and "contaminated" are
# candidates removed before they were judged.
ROUND_COUNTS = ("candidates", "fresh", "kept", "undecided", "not_needed", "duplicate",
                "contaminated")
# Kept pairs removed by the screen of the final pairs.
PAIRS_DUPLICATE = "pairs.duplicate"
PAIRS_CONTAMINATED = "pairs.contaminated"
# Seeds matching a --decontaminate file (left out of encoding unless kept).
SEEDS_CONTAMINATED = "seeds.contaminated"
# Benchmark rows too short for a share of their 3-grams: compared whole.
BENCHMARK_SHORT_ROWS = "decontaminate.short_rows"


def paid_before(numbers: dict) -> dict[str, float]:
    """Of a stage's counters: what earlier runs paid for the cached answers, keyed by
    `PAID`."""
    return {name: numbers.get(before, 0) for name, before in PAID_BEFORE.items()}


def paid_in_all(numbers: dict) -> dict[str, float]:
    """Of a stage's counters: what its answers cost, whichever run paid for them."""
    return {name: numbers.get(name, 0) + numbers.get(before, 0)
            for name, before in PAID_BEFORE.items()}


def rows_read(stage: str) -> str:
    return f"{stage}.rows"


def duplicates(stage: str) -> str:
    return f"{stage}.duplicates"


def in_round(number: int, what: str) -> str:
    assert what in ROUND_COUNTS, what
    return f"round{number}.{what}"


def incomplete(judge_stage: str) -> str:
    """Contests of which a judge call failed for good (its dead letter says why)."""
    return f"{judge_stage}_incomplete"


def model_namespace(stage: str, model_id: str) -> str:
    return f"{PREFIX}{stage}/{model_id}"


# Where a local run's worker processes (a multi-process DirectRunner) publish their
# mirrors for the launcher's live progress: "<launcher pid>:<folder>", set by the
# launcher (`LIVE.share`) before the runner starts its workers, which inherit it.
LIVE_FOLDER_ENV = "CODECLM_LIVE_FOLDER"
# How often a worker publishes what changed; and once more as it exits.
PUBLISH_EVERY_S = 0.5


class LiveFigures(NamedTuple):
    values: dict  # (namespace, name) -> value
    in_flight: dict  # stage -> calls out now
    jobs: dict  # stage -> {batch job name: (its last seen phase, whether finished)}
    # Transport retries so far, and (seconds ago, message) of the last retried error.
    retries: tuple


class _Live:
    """The process-local mirror of every counter, plus the calls in flight.

    A worker process of a local run publishes its mirror to the folder named by
    LIVE_FOLDER_ENV (a JSON file per process, replaced whole); the launcher's reads sum
    its own mirror and every worker's. Not a Beam metric: the runner reports those only
    when the run ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], int] = collections.Counter()
        self._in_flight: dict[str, int] = collections.Counter()
        # stage -> {batch job name: (its last seen phase, whether it has finished)}
        self._jobs: dict[str, dict[str, tuple[str, bool]]] = collections.defaultdict(dict)
        # Transport retries as they happen (the counters see them when a call ends),
        # and the last error retried, with its wall-clock time (comparable across
        # processes).
        self._retries = 0
        self._last_error: Optional[tuple[float, str]] = None
        self._changed = False
        # The file this process publishes to ("": it does not; None: not decided yet).
        self._publishing: Optional[str] = None
        self._shared: Optional[str] = None  # the folder this process reads workers' from

    def _mutated(self) -> None:
        # Under the lock, on every increment: whether this process publishes is decided
        # at its first change (a worker inherits the folder when it starts; the
        # launcher, which names it, never publishes), then only a flag is set.
        self._changed = True
        if self._publishing is not None:
            return
        self._publishing = ""
        owner, _, folder = os.environ.get(LIVE_FOLDER_ENV, "").partition(":")
        if folder and owner != str(os.getpid()) and os.path.isdir(folder):
            self._publishing = os.path.join(folder, f"{os.getpid()}.json")
            threading.Thread(target=self._publish_loop, daemon=True,
                             name="codeclm-live-publish").start()
            atexit.register(self._publish)

    def inc(self, namespace: str, name: str, value: int) -> None:
        with self._lock:
            self._values[(namespace, name)] += value
            self._mutated()

    def flying(self, stage: str, delta: int) -> None:
        with self._lock:
            self._in_flight[stage] += delta
            self._mutated()

    def job(self, stage: str, name: str, phase: str, finished: bool) -> None:
        with self._lock:
            self._jobs[stage][name] = (phase, finished)
            self._mutated()

    def retried(self, error: str) -> None:
        with self._lock:
            self._retries += 1
            self._last_error = (time.time(), error)
            self._mutated()

    def _state(self) -> dict:
        return {"values": [[ns, name, v] for (ns, name), v in self._values.items()],
                "in_flight": dict(self._in_flight),
                "jobs": {stage: {name: list(job) for name, job in jobs.items()}
                         for stage, jobs in self._jobs.items()},
                "retries": self._retries,
                "last_error": list(self._last_error) if self._last_error else None}

    def _publish(self) -> None:
        with self._lock:
            if not self._changed:
                return
            self._changed = False
            state = json.dumps(self._state())
        # Replaced whole, so the launcher never reads half a file.
        partial = f"{self._publishing}.partial"
        try:
            with open(partial, "w") as f:
                f.write(state)
            os.replace(partial, self._publishing)
        except OSError:
            pass  # the launcher removed the folder: the run is over

    def _publish_loop(self) -> None:
        while True:
            time.sleep(PUBLISH_EVERY_S)
            self._publish()

    def share(self, folder: Optional[str]) -> None:
        """In the launcher: its workers publish to `folder` from now on (None: stop)."""
        if folder is None:
            os.environ.pop(LIVE_FOLDER_ENV, None)
        else:
            os.environ[LIVE_FOLDER_ENV] = f"{os.getpid()}:{folder}"
        self._shared = folder

    def _states(self) -> list[dict]:
        """This process's state and each worker's last published one."""
        with self._lock:
            states = [self._state()]
        if self._shared:
            for name in sorted(glob.glob(os.path.join(self._shared, "*.json"))):
                try:
                    with open(name) as f:
                        states.append(json.load(f))
                except (OSError, ValueError):
                    continue
        return states

    def read(self) -> "LiveFigures":
        """This process's mirror summed with every worker's, from one read of their
        publications, so the figures of one moment agree with one another."""
        values, in_flight = collections.Counter(), collections.Counter()
        jobs: dict[str, dict[str, tuple[str, bool]]] = collections.defaultdict(dict)
        retries, last_error = 0, None
        for state in self._states():
            for ns, name, value in state["values"]:
                values[(ns, name)] += value
            in_flight.update(state["in_flight"])
            for stage, stage_jobs in state["jobs"].items():
                jobs[stage].update({name: tuple(job) for name, job in stage_jobs.items()})
            retries += state["retries"]
            if state["last_error"] and (last_error is None or state["last_error"] > last_error):
                last_error = state["last_error"]  # the latest: [wall-clock time, message]
        return LiveFigures(
            dict(values), {k: v for k, v in in_flight.items() if v}, dict(jobs),
            (retries, None if last_error is None
             else (time.time() - last_error[0], last_error[1])))

    def reset(self) -> None:
        with self._lock:
            self._values.clear()
            self._in_flight.clear()
            self._jobs.clear()
            self._retries, self._last_error = 0, None


LIVE = _Live()


class Counter:
    """A Beam counter that the live progress can see too. Create it in `setup` (or
    lazily), like a Beam counter."""

    def __init__(self, namespace: str, name: str):
        self._namespace = namespace
        self._name = name
        self._beam = Metrics.counter(namespace, name)

    def inc(self, value: int = 1) -> None:
        self._beam.inc(value)
        LIVE.inc(self._namespace, self._name, value)


def flow_counter(name: str) -> Counter:
    return Counter(FLOW, name)


def dead_letter_counter(stage: str) -> Counter:
    return Counter(DEAD_LETTERS, stage)


class RunCounters:
    """A run's codeclm counters, {namespace: {name: value}}, however they were read:
    from a finished Beam result, from a Dataflow job's metrics, or live."""

    def __init__(self, values: dict[str, dict[str, float]]):
        self._values = values

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[tuple[str, str], float]]) -> "RunCounters":
        values: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for (namespace, name), value in pairs:
            if namespace.startswith(PREFIX):
                values[namespace][name] = values[namespace].get(name, 0) + (value or 0)
        return cls(dict(values))

    @classmethod
    def from_result(cls, result) -> "RunCounters":
        """Committed counters of a finished Beam run (attempted where a runner does
        not commit)."""
        from apache_beam.metrics.metric import MetricsFilter
        counters = result.metrics().query(MetricsFilter())["counters"]
        return cls.from_pairs(
            ((c.key.metric.namespace, c.key.metric.name),
             c.committed if c.committed is not None else c.attempted) for c in counters)

    def flow(self, name: str) -> int:
        return int(self._values.get(FLOW, {}).get(name, 0))

    def in_round(self, number: int, what: str) -> int:
        return self.flow(in_round(number, what))

    def reference_buckets(self) -> dict[str, int]:
        """The buckets deduplication sent earlier rounds' candidates into, and those it
        did not (no candidate of the round there)."""
        values = self._values.get(DEDUP, {})
        return {"sent": int(values.get(REFERENCE_BUCKETS_SENT, 0)),
                "skipped": int(values.get(REFERENCE_BUCKETS_SKIPPED, 0))}

    def rounds(self) -> list[int]:
        """The round numbers that counted anything, in order."""
        numbers = {int(name[5:].split(".", 1)[0]) for name in self._values.get(FLOW, {})
                   if name.startswith("round") and name[5:].split(".", 1)[0].isdigit()}
        return sorted(numbers)

    def dead_letters(self) -> dict[str, int]:
        return {stage: int(v) for stage, v in self._values.get(DEAD_LETTERS, {}).items()}

    def dead_letter(self, stage: str) -> int:
        return self.dead_letters().get(stage, 0)

    def model_calls(self) -> dict[str, Any]:
        """Per stage and model: requests, cache hits, retries, tokens...; and totals."""
        stages: dict[str, Any] = {}
        for namespace, values in sorted(self._values.items()):
            # A model id may hold "/" (a server URL): split at the first two only.
            if namespace in (FLOW, DEAD_LETTERS) or namespace.count("/") < 2:
                continue
            _, stage, model = namespace.split("/", 2)
            numbers = {name: int(values.get(name, 0)) for name in MODEL_COUNTERS
                       if name not in _MILLISECONDS}
            for name, seconds in _MILLISECONDS.items():
                numbers[seconds] = values.get(name, 0) / 1000
            stages.setdefault(stage, {"models": {}})["models"][model] = numbers
        return {"by_stage": stages, "totals": _summed(
            numbers for entry in stages.values() for numbers in entry["models"].values())}

    def stage_totals(self) -> dict[str, dict[str, float]]:
        """Per stage, its model counters summed over its models."""
        return {stage: _summed(entry["models"].values())
                for stage, entry in self.model_calls()["by_stage"].items()}

    def summary(self) -> dict[str, float]:
        """The figures `jobs status` and the progress display show."""
        totals = self.model_calls()["totals"]
        kept = sum(self.in_round(n, "kept") for n in self.rounds())
        result = {name: totals.get(name, 0) for name in
                  ("requests", "cache_hits", "retries", "failures", "truncated",
                   *TOKEN_KINDS, "throttled_seconds", "batch_jobs",
                   "batch_jobs_ended", "batch_jobs_failed", "batch_wait_seconds")}
        result.update(kept_pairs=kept, examples_written=self.flow(EXAMPLES),
                      dead_letters=sum(self.dead_letters().values()))
        return result


def _summed(counts: Iterable[dict]) -> dict:
    totals: collections.Counter = collections.Counter()
    for numbers in counts:
        totals.update(numbers)
    return dict(totals)
