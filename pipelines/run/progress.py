"""Live progress of a local run: what the pipeline counts, shown while it runs.

It reads the process-local mirror of the run's counters (`codeclm_beam.metrics.LIVE`):
the same increments as the Beam counters the manifest reads, visible before the run
ends. The worker processes of a multi-process DirectRunner publish their mirrors to a
folder this progress names for the run (`metrics.LIVE.share`). It makes no model call
and changes no output. On a terminal it is one tqdm status bar, with a line written
above it at each stage change; elsewhere (CI, logs) it is plain lines every `interval`
seconds and at each stage change. Dataflow's workers are out of reach: `jobs status
--watch` shows a Dataflow job's figures.
"""
from __future__ import annotations

import collections
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable, Optional, TextIO

from apache_beam.options.pipeline_options import StandardOptions

from codeclm_beam import metrics
from codeclm_beam.metrics import RunCounters
from codeclm_beam.model.types import Usage
from codeclm_beam.pipelines.run.args import RunOptions
from codeclm_beam.pipelines.run.args import is_dry_run
from codeclm_beam.transforms.method import METHOD
from codeclm_beam.transforms.method import stage_names

# Stages in the order a generate or evaluate run reaches them.
STAGE_ORDER = (*stage_names(METHOD), "eval_answer_reference", "eval_answer_candidate",
               "eval_judge")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Snapshot:
    """The figures of one moment of a run."""

    def __init__(self, counters: RunCounters, in_flight: dict[str, int], elapsed: float,
                 batch_jobs: Optional[dict[str, dict[str, tuple[str, bool]]]] = None,
                 retries: tuple[int, Optional[tuple[float, str]]] = (0, None),
                 order: tuple[str, ...] = ()):
        self.counters = counters
        # The stages in the order a run reaches them (default: STAGE_ORDER).
        self.order = order or STAGE_ORDER
        # Transport retries so far, and (seconds ago, message) of the last one.
        self.retries, self.last_error = retries
        # A stage waiting for a batch prediction job has its elements in flight.
        self.batch_jobs = batch_jobs or {}
        self.in_flight = {**in_flight, **{
            stage: 1 for stage, jobs in self.batch_jobs.items()
            if stage not in in_flight
            and not all(finished for _, finished in jobs.values())}}
        self.elapsed = elapsed
        self.by_stage = counters.stage_totals()
        self.totals = counters.summary()

    @property
    def calls_done(self) -> int:
        """Elements answered, from the model or the cache."""
        return sum(s["elements"] for s in self.by_stage.values())

    @property
    def round(self) -> int:
        rounds = [n for n in self.counters.rounds()
                  if self.counters.in_round(n, "candidates")]
        return max(rounds) if rounds else 0

    def stage(self) -> Optional[str]:
        """The stage at work: the latest with calls in flight, else the latest reached."""
        stages = self.stages()
        return stages[-1] if stages else None

    def stages(self) -> list[str]:
        """The stages at work, in the method's order: every one with calls in flight
        (a round's answers and judgements overlap), else the latest reached."""
        def position(stage: str) -> int:
            return self.order.index(stage) if stage in self.order else len(self.order)
        if self.in_flight:
            return sorted(self.in_flight, key=position)
        reached = [s for s in self.by_stage if self.by_stage[s]["elements"]]
        return [max(reached, key=position)] if reached else []


def describe(snapshot: Snapshot, wanted: Optional[int],
             projected_calls: Optional[int], rate: Optional[float] = None) -> str:
    """One line: the round, each stage at work with its figures over the whole run so
    far, the kept pairs and an ETA. `rate`: calls a second lately (default: since the
    start), which the ETA divides the calls left by."""
    parts = [f"[{_duration(snapshot.elapsed)}]"]
    if snapshot.round:
        parts.append(f"round {snapshot.round}")
    stages = snapshot.stages()
    if not stages:
        parts.append("reading inputs")
    at_work = []
    for stage in stages:
        s = snapshot.by_stage.get(stage, {})
        tokens = Usage.from_dict(s).billed
        figures = (f"{stage}: {s.get('elements', 0)} done, "
                   f"{snapshot.in_flight.get(stage, 0)} in flight, "
                   f"{s.get('cache_hits', 0)} cache hits, {tokens} tokens, "
                   f"{snapshot.counters.dead_letter(stage)} dead letters")
        jobs = snapshot.batch_jobs.get(stage)
        if jobs:
            states = collections.Counter(phase for phase, _ in jobs.values())
            waited = s.get("batch_wait_seconds", 0)
            figures += ("; batch jobs " + ", ".join(
                f"{n} {state}" for state, n in sorted(states.items()))
                + f" (waited {_duration(waited)})")
        at_work.append(figures)
    if at_work:
        parts.append("; ".join(at_work))
    totals = snapshot.totals
    # Unresolved candidates kept anyway (--keep_unresolved) are only counted as
    # examples when written, at the end.
    kept = max(int(totals["kept_pairs"]), int(totals["examples_written"]))
    if wanted:  # what is kept beyond the pairs asked for is surplus, cut at the end
        parts.append(f"kept {min(kept, wanted)}/{wanted}")
    parts.append(f"dead letters {int(totals['dead_letters'])}")
    if snapshot.retries:
        ago, message = snapshot.last_error or (0.0, "")
        parts.append(f"retries {snapshot.retries} (last {_duration(ago)} ago: {message})")
    done = snapshot.calls_done
    # Calls are elements answered (from the model or the cache); requests sent count
    # every re-ask and retry too, as the summary does.
    sent = int(totals["requests"])
    sent_text = f" ({sent} requests sent)" if sent != done else ""
    if projected_calls:
        eta = ""
        rate = rate if rate else (done / snapshot.elapsed if snapshot.elapsed else 0)
        if done and rate and projected_calls > done:
            eta = f", ETA ~{_duration((projected_calls - done) / rate)}"
        parts.append(f"calls {done} of ~{max(projected_calls, done)}{sent_text}{eta}")
    else:
        parts.append(f"calls {done}{sent_text}")
    return " | ".join(parts)


class LiveProgress:
    """`with LiveProgress(...): pipeline.run()`: progress while the block runs."""

    def __init__(self, wanted: Optional[int] = None,
                 projected_calls: Optional[Callable[[RunCounters], Optional[int]]] = None,
                 stream: Optional[TextIO] = None, interval: float = 10.0,
                 tick: float = 1.0):
        self._wanted = wanted
        self._projected = projected_calls or (lambda counters: None)
        self._stream = stream or sys.stderr
        self._interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0
        self._bar = None
        self._paces: collections.deque = collections.deque()

    def __enter__(self) -> "LiveProgress":
        metrics.LIVE.reset()
        self._shared = tempfile.mkdtemp(prefix="codeclm-live-")
        metrics.LIVE.share(self._shared)
        self._started = time.monotonic()
        if self._stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self._wanted, unit="pair", file=self._stream,
                             dynamic_ncols=True, leave=False,
                             bar_format="{desc}")
        self._thread = threading.Thread(target=self._run, name="codeclm-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        # The runner has stopped its workers by now: their last publications are in.
        self._emit(self.snapshot(), final=True)
        metrics.LIVE.share(None)
        shutil.rmtree(self._shared, ignore_errors=True)
        if self._bar is not None:
            self._bar.close()

    def snapshot(self) -> Snapshot:
        live = metrics.LIVE.read()
        return Snapshot(RunCounters.from_pairs(live.values.items()), live.in_flight,
                        time.monotonic() - self._started, live.jobs, live.retries)

    # The ETA's pace: calls over the last RATE_WINDOW_S seconds (the first stages'
    # long structured answers are slower per call than the rounds' answers, so the
    # pace since the start swings the ETA), once that window holds some seconds.
    RATE_WINDOW_S = 60.0
    MIN_RATE_SPAN_S = 10.0

    def rate(self, snapshot: Snapshot) -> Optional[float]:
        self._paces.append((snapshot.elapsed, snapshot.calls_done))
        while len(self._paces) > 2 and \
                snapshot.elapsed - self._paces[1][0] >= self.RATE_WINDOW_S:
            self._paces.popleft()
        since, done_then = self._paces[0]
        span = snapshot.elapsed - since
        if span < self.MIN_RATE_SPAN_S or snapshot.calls_done <= done_then:
            return None
        return (snapshot.calls_done - done_then) / span

    def line(self, snapshot: Snapshot) -> str:
        return describe(snapshot, self._wanted, self._projected(snapshot.counters),
                        self.rate(snapshot))

    def _run(self) -> None:
        last_stage, last_line = None, 0.0
        while not self._stop.wait(self._tick):
            snapshot = self.snapshot()
            stage = (snapshot.stage(), snapshot.round)
            changed = stage != last_stage
            if self._bar is not None:
                if changed and last_stage is not None:
                    self._bar.write(self.line(snapshot), file=self._stream)
                self._bar.set_description_str(self.line(snapshot))
            elif changed or snapshot.elapsed - last_line >= self._interval:
                self._emit(snapshot)
                last_line = snapshot.elapsed
            last_stage = stage

    def _emit(self, snapshot: Snapshot, final: bool = False) -> None:
        # Once the run is over, what was done is the projection (and no ETA): the
        # projection counts a candidate lost to a dead letter as if it went on.
        text = ("done " + describe(snapshot, self._wanted, snapshot.calls_done) if final
                else self.line(snapshot))
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)


LOCAL_RUNNERS = ("directrunner", "direct", "prismrunner", "prism", "fnapirunner",
                 "bundlebasedirectrunner", "switchingdirectrunner")


def progress_for(options, wanted: Optional[int] = None,
                 projected_calls: Optional[Callable[[RunCounters], Optional[int]]] = None):
    """LiveProgress for a local run, a no-op context otherwise (--quiet, a dry run,
    or a runner whose workers the mirror cannot see)."""
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    runner = runner if isinstance(runner, str) else type(runner).__name__
    if options.view_as(RunOptions).quiet or is_dry_run(options) or \
            runner.lower() not in LOCAL_RUNNERS:
        return contextlib.nullcontext()
    return LiveProgress(wanted, projected_calls)
