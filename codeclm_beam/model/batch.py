"""Batch jobs as a transport: `BatchInference`, what a stage runs in place of
`RunInference` when its model's --vertex_mode is batch. The provider's batch API is
the backend's (`backends.BatchJobs`, Vertex AI's in `backends.vertex_batch`); what is
here is the same for any provider: shards, waves, job records, waiting.

    (record, request) ─Key─Shard─GroupByKey─> RunJobs ─> (record, PredictionResult)

Shards are cut by content to about 90% of a job (Vertex AI takes 200,000 requests and
1 GB a job); the rare one that still holds more is asked in two jobs or more, one after
the other. RunJobs sends a shard as waves of jobs: the first asks every request,
the next ones carry the re-asks (`asking.Asking`: a re-send with more room for a cut
answer, another seed for an unusable one). Re-asks go into the next job rather than
online: they are few, and the whole stage stays at the batch price. Every answer is
validated exactly as an online one.

A job is named by its content: under `{batch_dir}/{stage}/`, `{id}.jsonl` holds its
requests, `{id}.job.json` the job the provider created (written as soon as it exists; a
job created by a run killed before it could record it is found by its display name),
and the job writes its answers under `{id}.out/`. Requests are deterministic (seeded per
element), so a killed or re-run pipeline builds the same waves, finds their records and
waits for or reads those jobs instead of paying for them again; answers already in the
response cache never reach this transport (`calls.ModelCall`). A job that ended
failed, cancelled or expired is submitted anew by a re-run.

Waiting is reported as throttled time (Dataflow's autoscaler then does not add
workers to wait), and each job's state goes to the live progress and the run's
counters (`jobs status`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from typing import Any, Callable, Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult

from codeclm_beam import metrics
from codeclm_beam.model.asking import AnswerCheck
from codeclm_beam.model.asking import AnswerValidator
from codeclm_beam.model.asking import Asking
from codeclm_beam.model.asking import ReaskPolicy
from codeclm_beam.model.backends import BatchJob
from codeclm_beam.model.backends import BatchJobs
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.backends import create_backend
from codeclm_beam.model.client import ModelClient
from codeclm_beam.model.client import transport_retrying
from codeclm_beam.model.config import ONLINE
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import BatchJobFailed
from codeclm_beam.model.errors import BatchTimeout
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.errors import ModelError
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.meter import StageMetrics
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResult

_LOG = logging.getLogger(__name__)

# Shards by hash hold their mean +- a few hundred requests at 200,000: aiming at 90%
# of a job keeps them within it.
_SHARD_FILL = 0.9
# After a cancel, how long to wait for the job to settle before reading what it wrote.
_CANCEL_SETTLE_S = 600.0


def _label(key: str) -> str:
    # A request's label in its job: short enough for any provider's label values.
    return key[:48]


def _path_part(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage)


def _read_json(path: str) -> Optional[dict]:
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


@dataclasses.dataclass
class JobOutcome:
    """What one job answered: per request label, its answer or why there is none."""
    answered: bool  # False: the job ended without answers (failed, cancelled, ...)
    answers: dict[str, Any]  # label -> RawAnswer | ModelError
    missing: ModelError  # for a request with no line in the output


class JobWave:
    """Runs one wave of requests as one batch job (or finds the job a previous attempt
    submitted), waits for it, and reads its answers back, through the provider's
    `BatchJobs`; every call to it is retried as a request is."""

    def __init__(self, config: ModelConfig, stage: str, jobs: BatchJobs,
                 on_wait: Callable[[float, BatchJob], None]):
        self._config = config
        self._stage = stage
        self._jobs = jobs
        self._on_wait = on_wait
        self._retrying = transport_retrying(config)

    def _api(self, method: str, *args):
        return self._retrying(getattr(self._jobs, method), *args)

    def run(self, requests: dict[str, ModelRequest]) -> JobOutcome:
        """`requests` by cache key; a job is named by their content."""
        content_id = hashlib.sha256("\n".join(sorted(requests)).encode()).hexdigest()[:32]
        base = FileSystems.join(self._config.batch.batch_dir, _path_part(self._stage),
                                content_id)
        display_name = f"codeclm-{_path_part(self._stage)}-{content_id}"
        record = _read_json(base + ".job.json")
        if record is None:
            # A run killed between creating the job and recording it: find it by name.
            record = self._find(display_name, base)
        job = None
        if record is not None:
            try:
                job = self._api("get", record["job"])
            except PermanentModelError as gone:
                if gone.status != 404:
                    raise
                _LOG.warning("batch job %s is gone: submitting anew", record["job"])
            if job is not None and not job.answered:
                _LOG.info("batch job %s of a previous run ended %s: submitting anew",
                          job.name, job.state)
                job = None
            elif job is not None:
                _LOG.info("resuming batch job %s (%s) for %d requests", job.name,
                          job.state, len(requests))
        labelled = {_label(key): request for key, request in requests.items()}
        if job is None:
            job = self._submit(base, display_name, labelled)
        job, timed_out = self._wait(job)
        return self._read(job, timed_out, labelled)

    def _find(self, display_name: str, base: str) -> Optional[dict]:
        job = self._api("find", display_name)
        if job is None:
            return None
        _LOG.info("found unrecorded batch job %s (%s): recording it", job.name, job.state)
        record = {"job": job.name, "model": self._config.uri, "stage": self._stage,
                  "input": base + ".jsonl"}
        _write(base + ".job.json", json.dumps(record).encode())
        return record

    def _submit(self, base: str, display_name: str, labelled: dict[str, ModelRequest]
                ) -> BatchJob:
        job = self._api("submit", labelled, base, display_name)
        # Recorded at once: from here a re-run must find this job, not pay again.
        _write(base + ".job.json", json.dumps({
            "job": job.name, "model": self._config.uri, "stage": self._stage,
            "requests": len(labelled), "input": base + ".jsonl"}).encode())
        _LOG.info("submitted batch job %s: %d requests of %s", job.name, len(labelled),
                  self._stage)
        return job

    def _wait(self, job: BatchJob) -> tuple[BatchJob, bool]:
        batch = self._config.batch
        delay, timed_out, cancelled_at = batch.poll_initial_s, False, None
        while not job.finished:
            if cancelled_at is None and job.age_s > batch.timeout_s:
                _LOG.warning("batch job %s still %s after %.0f s: cancelling", job.name,
                             job.state, batch.timeout_s)
                self._api("cancel", job.name)
                timed_out, cancelled_at = True, time.monotonic()
            elif cancelled_at is not None and \
                    time.monotonic() - cancelled_at > _CANCEL_SETTLE_S:
                break  # read whatever it wrote; its other requests time out
            time.sleep(delay)
            self._on_wait(delay, job)
            delay = min(delay * 2, batch.poll_max_s)
            job = self._api("get", job.name)
        self._on_wait(0.0, job)
        return job, timed_out

    def _read(self, job: BatchJob, timed_out: bool, labelled: dict[str, ModelRequest]
              ) -> JobOutcome:
        found = self._api("retrieve", job, labelled)
        missing_why = (f"{job.ended()}; no answer line for this request"
                       + (f" ({found.unreadable} output lines were unreadable)"
                          if found.unreadable else ""))
        missing = (BatchTimeout(f"cancelled at --batch_timeout; {missing_why}")
                   if timed_out else BatchJobFailed(missing_why))
        return JobOutcome(job.answered, found.answers, missing)


def _prediction(request: ModelRequest, result: ModelResult, config: ModelConfig):
    return PredictionResult(example=request, inference=result, model_id=config.uri)


class _RunJobs(beam.DoFn):
    """A shard's requests, answered by waves of batch jobs."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        self._config = config
        self._stage = stage
        self._check = check

    def setup(self):
        jobs = create_backend(self._config).batch_jobs()
        if jobs is None:
            raise ConfigurationError(f"{self._config.uri} has no batch API: "
                                     "use --vertex_mode online")
        self._jobs = jobs
        self._policy = ReaskPolicy.of(self._config)
        self._validator = AnswerValidator(self._check)
        self._online = None
        self._metrics = StageMetrics(self._stage, self._config.metered_id())

    def _on_wait(self, seconds: float, job: BatchJob) -> None:
        self._metrics.waited(seconds)
        metrics.LIVE.job(self._stage, job.name, job.phase, job.finished)

    def process(self, shard):
        _, keyed = shard
        by_key: dict[str, list] = collections.defaultdict(list)
        for key, record_and_request in keyed:
            by_key[key].append(record_and_request)
        # One Asking per distinct request: identical requests are asked once.
        asking = {key: Asking(items[0][1], self._policy, self._validator)
                  for key, items in by_key.items()}
        timed_out: list[str] = []
        # A shard is filled to 90% of a job on average; the rare one over the limit
        # is asked in more jobs, one after the other.
        for chunk in _chunks(sorted(asking), lambda key: _request_bytes(by_key[key][0]),
                             self._config.batch):
            timed_out += self._ask_in_jobs({key: asking[key] for key in chunk})
        results = {key: a.result() for key, a in asking.items()}
        fallback = timed_out if self._config.batch.fallback == ONLINE else []
        # What went online is counted there as the element; its billed lines here.
        self._metrics.record([results[key] for key in fallback], final=False)
        self._metrics.record([results[key] for key in results if key not in fallback])
        if fallback:
            results.update(self._ask_online(fallback, asking))
        for key, items in by_key.items():
            for record, request in items:
                yield record, _prediction(request, results[key], self._config)

    def _ask_in_jobs(self, asking: dict[str, Asking]) -> list[str]:
        """Waves of jobs until every element has a usable answer or has failed; the
        keys of those a timed-out job left unanswered."""
        wave = JobWave(self._config, self._stage, self._jobs, self._on_wait)
        identity = self._config.identity
        timed_out = []
        while True:
            pending = {a.next_request.cache_key(identity): key
                       for key, a in asking.items() if a.next_request is not None}
            if not pending:
                return timed_out
            self._metrics.job_started()
            try:
                outcome = wave.run({sent: asking[key].next_request
                                    for sent, key in pending.items()})
            except ModelError as refused:
                # The job could not be submitted or followed (a model without batch
                # prediction, missing permissions): each element says so, as online.
                outcome = JobOutcome(False, {}, refused)
            self._metrics.job_ended(failed=not outcome.answered)
            for sent, key in pending.items():
                answer = outcome.answers.get(_label(sent), outcome.missing)
                if isinstance(answer, RawAnswer):
                    asking[key].charge(answer)
                    asking[key].take(answer)
                else:
                    asking[key].fail(answer)
                    if isinstance(answer, BatchTimeout):
                        timed_out.append(key)

    def _ask_online(self, keys: list[str], asking: dict) -> dict[str, ModelResult]:
        """--batch_fallback online: what a timed-out job left unanswered, sent online
        and metered apart, at the online price."""
        if self._online is None:
            self._online = (ModelClient(self._config.replace(vertex_mode=ONLINE),
                                        check=self._check),
                            StageMetrics(self._stage, self._config.metered_id(ONLINE)))
        client, online_metrics = self._online
        results = dict(zip(keys, client.ask_all([asking[key].request for key in keys])))
        online_metrics.record(results.values())
        return results


def _chunks(keys: list[str], weigh: Callable[[str], int], batch) -> Iterable[list[str]]:
    """`keys` in order, cut into runs within one job's limits."""
    chunk, size = [], 0
    for key in keys:
        weight = weigh(key)
        if chunk and (len(chunk) >= batch.max_requests_per_job
                      or size + weight > batch.max_bytes_per_job):
            yield chunk
            chunk, size = [], 0
        chunk.append(key)
        size += weight
    if chunk:
        yield chunk


def _request_bytes(keyed) -> int:
    # What a line weighs, near enough to keep a job under 1 GB: the prompt, the schema
    # and room for the JSON around them.
    request = keyed[1]
    return 2 * request.prompt_chars() + len(request.json_schema_text or "") + 512


def _shard_of(to_ask, totals, config: ModelConfig):
    """The shard of a request, by its cache key, so that a re-run puts it where it
    was."""
    count, size = totals
    shards = max(1, math.ceil(count / (_SHARD_FILL * config.batch.max_requests_per_job)),
                 math.ceil(size / (_SHARD_FILL * config.batch.max_bytes_per_job)))
    return int(to_ask[0][:8], 16) % shards, to_ask


class BatchInference(beam.PTransform):
    """(record, ModelRequest) pairs in, (record, PredictionResult) out, as
    `RunInference(KeyedModelHandler(CodecLMModelHandler(...)))` gives: the same
    results, the requests sent as batch jobs. No cache is read or written here:
    `calls.ModelCall` does that around this transport.

    `sized_by` is the stage's whole input when only part of it reaches here (the
    cache answered the rest): shards are counted from the whole stage, so a re-run
    cuts what is left as before and finds the jobs it already submitted."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None, sized_by=None):
        super().__init__()
        self._config = config
        self._stage = stage
        self._check = check
        self._sized_by = sized_by

    def expand(self, pairs):
        config = self._config
        sized_by = pairs if self._sized_by is None else self._sized_by
        totals = (sized_by | "Weigh" >> beam.Map(lambda keyed: (1, _request_bytes(keyed)))
                  | "Total" >> beam.CombineGlobally(
                      beam.combiners.TupleCombineFn(sum, sum)))
        return (pairs
                | "Key" >> beam.Map(lambda keyed: (
                    keyed[1].cache_key(config.identity), keyed))
                | "Shard" >> beam.Map(_shard_of, beam.pvalue.AsSingleton(totals), config)
                | "Gather" >> beam.GroupByKey()
                | "RunJobs" >> beam.ParDo(_RunJobs(config, self._stage, self._check)))
