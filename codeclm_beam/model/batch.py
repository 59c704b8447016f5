"""Vertex AI batch prediction as a transport: `BatchInference`, what a stage runs in
place of `RunInference` when its model's --vertex_mode is batch.

    (record, request) ─LookUpCache─> answered ──────────────────────────────┐
            └─ not cached ─Shard─GroupByKey─> RunJobs ─> answered ──────────┴─> (record,
                                                                           PredictionResult)

Shards are cut by content to about 90% of a job (Vertex AI takes 200,000 requests and
1 GB a job); the rare one that still holds more is asked in two jobs or more, one after
the other. RunJobs sends a shard as waves of jobs: the first asks every request,
the next ones carry the re-asks (`handler.Asking`: a re-send with more room for a cut
answer, another seed for an unusable one). Re-asks go into the next job rather than
online: they are few, and the whole stage stays at the batch price. Every answer is
validated exactly as an online one, and written to the response cache.

A job is named by its content: under `{batch_dir}/{stage}/`, `{id}.jsonl` holds its
requests, `{id}.job.json` the job Vertex AI created (written as soon as it exists; a
job created by a run killed before it could record it is found by its display name),
and the job writes its answers under `{id}.out/`. Requests are deterministic (seeded per
element), so a killed or re-run pipeline builds the same waves, finds their records and
waits for or reads those jobs instead of paying for them again; answers already in the
response cache never enter a job. A job that ended failed, cancelled or expired is
submitted anew by a re-run.

Waiting is reported as throttled time (Dataflow's autoscaler then does not add
workers to wait), and each job's state goes to the live progress and the run's
counters (`jobs status`).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
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
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.cache import ResponseCache
from codeclm_beam.model.config import ONLINE
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import BatchTimeout
from codeclm_beam.model.errors import ModelError
from codeclm_beam.model.errors import BatchJobFailed
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.errors import classify_http_status
from codeclm_beam.model.handler import Asking
from codeclm_beam.model.handler import ModelClient
from codeclm_beam.model.handler import StageMetrics
from codeclm_beam.model.handler import AnswerCheck
from codeclm_beam.model.handler import AnswerValidator
from codeclm_beam.model.handler import transport_retrying
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResult
from codeclm_beam.model.types import canonical_json

_LOG = logging.getLogger(__name__)

TO_ASK = "to_ask"
# The label that carries a request's cache key through a job and back with its answer
# (label values: at most 63 lowercase letters, digits, "-" and "_").
KEY_LABEL = "codeclm_key"
SUCCEEDED, PARTIALLY_SUCCEEDED = "JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"
FAILED, CANCELLED, EXPIRED = "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"
FINISHED = frozenset({SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED})
# A previous run's job that ended so is submitted again (its billed lines, if any,
# were answered and cached then, so they are not in the new job).
ENDED_WITHOUT_ANSWERS = frozenset({FAILED, CANCELLED, EXPIRED})
# Shards by hash hold their mean +- a few hundred requests at 200,000: aiming at 90%
# of a job keeps them within it.
_SHARD_FILL = 0.9
# After a cancel, how long to wait for the job to settle before reading what it wrote.
_CANCEL_SETTLE_S = 600.0


def _label(key: str) -> str:
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
    state: str
    answers: dict[str, Any]  # label -> RawAnswer | ModelError
    missing: ModelError  # for a request with no line in the output


class JobWave:
    """Runs one wave of requests as one batch prediction job (or finds the job a
    previous attempt submitted), waits for it, and reads its answers back."""

    def __init__(self, config: ModelConfig, stage: str, client: ModelClient,
                 on_wait: Callable[[float, str, str], None]):
        self._config = config
        self._stage = stage
        self._backend = client.backend  # the google-genai backend
        self._on_wait = on_wait
        self._retrying = transport_retrying(config)

    def _api(self, method: str, **kwargs):
        return self._api_call(lambda: getattr(self._backend.batches, method)(**kwargs))

    def _api_call(self, call: Callable[[], Any]):
        """A call to the batch jobs API, retried on transient errors like a request."""
        from codeclm_beam.model.backends.google import translate_error

        def translated():
            try:
                return call()
            except Exception as e:
                raise translate_error(e) from e
        return self._retrying(translated)

    def run(self, requests: dict[str, ModelRequest]) -> JobOutcome:
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
                job = self._api("get", name=record["job"])
            except PermanentModelError as gone:
                if gone.status != 404:
                    raise
                _LOG.warning("batch job %s is gone: submitting anew", record["job"])
            if job is not None and _state(job) in ENDED_WITHOUT_ANSWERS:
                _LOG.info("batch job %s of a previous run ended %s: submitting anew",
                          job.name, _state(job))
                job = None
            elif job is not None:
                _LOG.info("resuming batch job %s (%s) for %d requests", job.name,
                          _state(job), len(requests))
        if job is None:
            job = self._submit(base, display_name, requests)
        job, timed_out = self._wait(job)
        return self._read(job, timed_out, requests)

    def _find(self, display_name: str, base: str) -> Optional[dict]:
        def newest():
            jobs = self._backend.batches.list(
                config={"filter": f'display_name="{display_name}"', "page_size": 100})
            usable = [job for job in jobs if _state(job) not in ENDED_WITHOUT_ANSWERS]
            return max(usable, key=lambda job: job.create_time or 0, default=None)
        job = self._api_call(newest)
        if job is None:
            return None
        _LOG.info("found unrecorded batch job %s (%s): recording it", job.name,
                  _state(job))
        record = {"job": job.name, "model": self._config.uri, "stage": self._stage,
                  "input": base + ".jsonl"}
        _write(base + ".job.json", json.dumps(record).encode())
        return record

    def _submit(self, base: str, display_name: str, requests: dict[str, ModelRequest]):
        from google.genai import types

        with FileSystems.create(base + ".jsonl") as f:  # streamed: up to 1 GB
            for key, request in sorted(requests.items()):
                line = {"request": self._backend.rest_request(
                    request, {KEY_LABEL: _label(key)})}
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        job = self._api("create", model=self._config.spec.model, src=base + ".jsonl",
                        config=types.CreateBatchJobConfig(
                            dest=base + ".out", display_name=display_name))
        # Recorded at once: from here a re-run must find this job, not pay again.
        _write(base + ".job.json", json.dumps({
            "job": job.name, "model": self._config.uri, "stage": self._stage,
            "requests": len(requests), "input": base + ".jsonl"}).encode())
        _LOG.info("submitted batch job %s: %d requests of %s", job.name, len(requests),
                  self._stage)
        return job

    def _wait(self, job):
        batch = self._config.batch
        delay, timed_out, cancelled_at = batch.poll_initial_s, False, None
        while _state(job) not in FINISHED:
            if cancelled_at is None and _age_s(job) > batch.timeout_s:
                _LOG.warning("batch job %s still %s after %.0f s: cancelling", job.name,
                             _state(job), batch.timeout_s)
                self._api("cancel", name=job.name)
                timed_out, cancelled_at = True, time.monotonic()
            elif cancelled_at is not None and \
                    time.monotonic() - cancelled_at > _CANCEL_SETTLE_S:
                break  # read whatever it wrote; its other requests time out
            time.sleep(delay)
            self._on_wait(delay, job.name, _state(job))
            delay = min(delay * 2, batch.poll_max_s)
            job = self._api("get", name=job.name)
        self._on_wait(0.0, job.name, _state(job))
        return job, timed_out

    def _read(self, job, timed_out: bool, requests: dict[str, ModelRequest]
              ) -> JobOutcome:
        # A line is joined to its request by the label it carries; should the echoed
        # request come back without its labels, by the request itself (the requests
        # are rebuilt only then).
        by_body: dict[str, str] = {}

        def label_of(echoed: dict) -> str:
            label = (echoed.get("labels") or {}).get(KEY_LABEL)
            if label:
                return label
            if not by_body:
                by_body.update({_body_key(self._backend.rest_request(request, {})):
                                _label(key) for key, request in requests.items()})
            return by_body[_body_key(echoed)]

        state = _state(job)
        error = getattr(job, "error", None)
        why = f"batch job {job.name} ended {state}" + (
            f": {error.message}" if error is not None and error.message else "")
        answers: dict[str, Any] = {}
        unreadable = 0
        for line in _output_lines(job):
            try:
                entry = json.loads(line)
                label = label_of(entry["request"])
            except (ValueError, KeyError, TypeError, AttributeError):
                unreadable += 1
                continue
            status = entry.get("status")
            if status:
                # The request's own error, by its code: a 429 or 5xx line is the
                # service's state, not a refusal of the request.
                code = re.search(r'"code"\s*:\s*(\d{3})', str(status))
                answers[label] = classify_http_status(
                    int(code.group(1)) if code else 400,
                    f"{why}; this request: {status}")
                continue
            try:
                answers[label] = self._backend.answer_from(entry["response"])
            except Exception as e:  # an answer that is not a GenerateContentResponse
                answers[label] = BatchJobFailed(
                    f"{why}; unreadable answer line: {type(e).__name__}: {e}")
        if unreadable:
            _LOG.warning("%s: %d output lines unreadable", job.name, unreadable)
        missing_why = (f"{why}; no answer line for this request"
                       + (f" ({unreadable} output lines were unreadable)"
                          if unreadable else ""))
        missing = (BatchTimeout(f"cancelled at --batch_timeout; {missing_why}")
                   if timed_out else BatchJobFailed(missing_why))
        return JobOutcome(state, answers, missing)


def _body_key(body: dict) -> str:
    """A request body as the service may echo it: without its labels, and without the
    fields it echoes as null (`"file_data": null` beside a text part); key order
    never counts (canonical JSON)."""
    return canonical_json(_without_nulls({k: v for k, v in body.items() if k != "labels"}))


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _state(job) -> str:
    state = job.state
    return getattr(state, "value", None) or str(state)


def _age_s(job) -> float:
    created = job.create_time
    if created is None:
        return 0.0
    if created.tzinfo is None:
        created = created.replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()


def _output_lines(job) -> Iterable[str]:
    info = getattr(job, "output_info", None)
    directory = getattr(info, "gcs_output_directory", None) if info else None
    if not directory:
        return
    for match in FileSystems.match([directory.rstrip("/") + "/*.jsonl"])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    yield line


class _LookUpCache(beam.DoFn):
    """Answers from the response cache go straight out; the rest are to ask, as
    (cache key, (record, request))."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        self._config = config
        self._stage = stage
        self._check = check

    def setup(self):
        config = self._config
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._validator = AnswerValidator(self._check)
        self._metrics = StageMetrics(self._stage, config.metered_id())

    def process(self, keyed):
        record, request = keyed
        key = request.cache_key(self._config.identity)
        hit = self._validator.cached(self._cache, request, key)
        if hit is None:
            yield beam.pvalue.TaggedOutput(TO_ASK, (key, keyed))
            return
        self._metrics.record([hit])
        yield record, _prediction(request, hit, self._config)


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
        self._client = ModelClient(self._config, check=self._check)
        self._online = None
        self._metrics = StageMetrics(self._stage, self._config.metered_id())

    def _on_wait(self, seconds: float, job: str, state: str) -> None:
        self._metrics.waited(seconds)
        metrics.LIVE.job(self._stage, job, state)

    def process(self, shard):
        _, keyed = shard
        by_key: dict[str, list] = collections.defaultdict(list)
        for key, record_and_request in keyed:
            by_key[key].append(record_and_request)
        # One Asking per distinct request: identical requests are asked once.
        asking = {key: Asking(self._client, items[0][1]) for key, items in by_key.items()}
        timed_out: list[str] = []
        # A shard is filled to 90% of a job on average; the rare one over the limit
        # is asked in more jobs, one after the other.
        for chunk in _chunks(sorted(asking), lambda key: _request_bytes(by_key[key][0]),
                             self._config.batch):
            timed_out += self._ask_in_jobs({key: asking[key] for key in chunk})
        results = {key: self._client.finish(a) for key, a in asking.items()}
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
        wave = JobWave(self._config, self._stage, self._client, self._on_wait)
        timed_out = []
        while True:
            pending = {a.next_request.cache_key(self._client.identity): key
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
                outcome = JobOutcome(FAILED, {}, refused)
            self._metrics.job_ended(failed=outcome.state in ENDED_WITHOUT_ANSWERS)
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
        results = dict(zip(keys, client.call_all([asking[key].request for key in keys])))
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
    results, the requests sent as Vertex AI batch prediction jobs."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        super().__init__()
        self._config = config
        self._stage = stage
        self._check = check

    def expand(self, pairs):
        config = self._config
        looked_up = pairs | "LookUpCache" >> beam.ParDo(
            _LookUpCache(config, self._stage, self._check)).with_outputs(TO_ASK, main="answered")
        # (requests, bytes) of the stage, cached or not: a re-run then splits what is
        # left as before, and finds the jobs it already submitted.
        totals = (pairs | "Weigh" >> beam.Map(lambda keyed: (1, _request_bytes(keyed)))
                  | "Total" >> beam.CombineGlobally(
                      beam.combiners.TupleCombineFn(sum, sum)))
        answered = (looked_up[TO_ASK]
                    | "Shard" >> beam.Map(_shard_of, beam.pvalue.AsSingleton(totals),
                                          config)
                    | "Gather" >> beam.GroupByKey()
                    | "RunJobs" >> beam.ParDo(_RunJobs(config, self._stage, self._check)))
        return (looked_up.answered, answered) | "Answers" >> beam.Flatten()
