"""Vertex AI batch prediction (`batchPredictionJobs`) as `BatchJobs`: the input as
JSONL of REST `GenerateContentRequest`s on Cloud Storage, the job through google-genai's
`batches`, the answers read back from the job's output directory.

A request's label travels in the request's own `labels` and comes back in the echoed
request of its output line; should the service echo it without its labels, the line
is joined to its request by the request body itself.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Iterable, Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.backends import BatchAnswers
from codeclm_beam.model.backends import BatchJob
from codeclm_beam.model.backends import BatchJobs
from codeclm_beam.model.backends.deadline import MIN_DOWNLOAD_BYTES_PER_S
from codeclm_beam.model.backends.deadline import read_whole_within
from codeclm_beam.model.backends.google_errors import translate_error
from codeclm_beam.model.errors import BatchJobFailed
from codeclm_beam.model.errors import classify_http_status
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import canonical_json

_LOG = logging.getLogger(__name__)

# The request label that carries the caller's label (label values: at most 63
# lowercase letters, digits, "-" and "_").
KEY_LABEL = "codeclm_key"
SUCCEEDED, PARTIALLY_SUCCEEDED = "JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"
FAILED, CANCELLED, EXPIRED = "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"
FINISHED = frozenset({SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED})
ENDED_WITHOUT_ANSWERS = frozenset({FAILED, CANCELLED, EXPIRED})


class VertexBatchJobs(BatchJobs):
    def __init__(self, backend):
        self._backend = backend  # the GoogleGenAIBackend: its client and request form
        self._batches = backend.client.batches
        self._model = backend.model

    def _call(self, call):
        try:
            return call()
        except Exception as e:
            raise translate_error(e) from e

    def submit(self, requests: dict[str, ModelRequest], base: str,
               display_name: str) -> BatchJob:
        from google.genai import types

        with FileSystems.create(base + ".jsonl") as f:  # streamed: up to 1 GB
            for label, request in sorted(requests.items()):
                line = {"request": self._backend.rest_request(request, {KEY_LABEL: label})}
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        return _job(self._call(lambda: self._batches.create(
            model=self._model, src=base + ".jsonl",
            config=types.CreateBatchJobConfig(dest=base + ".out",
                                              display_name=display_name))))

    def get(self, name: str) -> BatchJob:
        return _job(self._call(lambda: self._batches.get(name=name)))

    def cancel(self, name: str) -> None:
        self._call(lambda: self._batches.cancel(name=name))

    def find(self, display_name: str) -> Optional[BatchJob]:
        def newest():
            jobs = self._batches.list(
                config={"filter": f'display_name="{display_name}"', "page_size": 100})
            usable = [job for job in jobs if _state(job) not in ENDED_WITHOUT_ANSWERS]
            return max(usable, key=lambda job: job.create_time or 0, default=None)
        found = self._call(newest)
        return None if found is None else _job(found)

    def retrieve(self, job: BatchJob, requests: dict[str, ModelRequest]) -> BatchAnswers:
        by_body: dict[str, str] = {}

        def label_of(echoed: dict) -> str:
            label = (echoed.get("labels") or {}).get(KEY_LABEL)
            if label:
                return label
            if not by_body:  # the requests are rebuilt only then
                by_body.update({_body_key(self._backend.rest_request(request, {})): label
                                for label, request in requests.items()})
            return by_body[_body_key(echoed)]

        why = job.ended()
        found = BatchAnswers({})
        for line in _output_lines(job.output, self._backend.request_timeout_s):
            try:
                entry = json.loads(line)
                label = label_of(entry["request"])
            except (ValueError, KeyError, TypeError, AttributeError):
                found.unreadable += 1
                continue
            status = entry.get("status")
            if status:
                # The request's own error, by its code: a 429 or 5xx line is the
                # service's state, not a refusal of the request.
                code = re.search(r'"code"\s*:\s*(\d{3})', str(status))
                found.answers[label] = classify_http_status(
                    int(code.group(1)) if code else 400,
                    f"{why}; this request: {status}")
                continue
            try:
                found.answers[label] = self._backend.answer_from(entry["response"])
            except Exception as e:  # an answer that is not a GenerateContentResponse
                found.answers[label] = BatchJobFailed(
                    f"{why}; unreadable answer line: {type(e).__name__}: {e}")
        if found.unreadable:
            _LOG.warning("%s: %d output lines unreadable", job.name, found.unreadable)
        return found


def _job(job) -> BatchJob:
    state = _state(job)
    error = getattr(job, "error", None)
    return BatchJob(name=job.name, state=state,
                    phase=state.removeprefix("JOB_STATE_").lower(),
                    finished=state in FINISHED,
                    answered=state not in ENDED_WITHOUT_ANSWERS, age_s=_age_s(job),
                    error=(error.message or None) if error is not None else None,
                    output=getattr(getattr(job, "output_info", None),
                                   "gcs_output_directory", None))


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


def _output_lines(directory: Optional[str], request_timeout_s: float) -> Iterable[str]:
    """The lines of the job's output files, each file read whole within the request
    timeout plus a second a MiB."""
    if not directory:
        return
    for match in FileSystems.match([directory.rstrip("/") + "/*.jsonl"])[0].metadata_list:
        content = read_whole_within(
            lambda: FileSystems.open(match.path), request_timeout_s
            + match.size_in_bytes / MIN_DOWNLOAD_BYTES_PER_S, match.path)
        for raw in content.splitlines():
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                yield line
