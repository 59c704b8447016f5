"""Vertex AI tuning jobs (`tuningJobs`) through google-genai's `tunings`: create, get,
find by labels, cancel; each call retried as a model call is (`transport_retrying`), and
its errors are the model layer's."""
from __future__ import annotations

import dataclasses
import datetime
import warnings
from typing import Any, Optional

from codeclm_beam.model.backends.google_errors import translate_error
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.redact import excerpt
from codeclm_beam.tuning import ADAPTER_SIZE_NAMES
from codeclm_beam.tuning import METHODS
from codeclm_beam.tuning import Hyperparameters

SUCCEEDED = "JOB_STATE_SUCCEEDED"
# The states a tuning job ends in (the rest: queued, pending, running, cancelling...).
ENDED = frozenset({SUCCEEDED, "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                   "JOB_STATE_EXPIRED"})


@dataclasses.dataclass(frozen=True)
class TuningJob:
    """A tuning job as the service last described it."""
    name: str
    state: str
    base_model: Optional[str]
    display_name: Optional[str]
    labels: dict[str, str]
    created: Optional[datetime.datetime]
    error: Optional[str]
    tuned_model: Optional[str]
    endpoint: Optional[str]
    # What the service reports of the data and the run: example count, billable
    # tokens, epochs it chose; empty until it has read the data.
    reported: dict[str, Any]
    # The service's finer state while it works (waiting for quota, processing the
    # dataset, tuning, ...), when it gives one.
    detail: Optional[str] = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def succeeded(self) -> bool:
        return self.state == SUCCEEDED and bool(self.endpoint)

    @property
    def phase(self) -> str:
        return self.state.removeprefix("JOB_STATE_").lower()

    def elapsed_s(self) -> float:
        if self.created is None:
            return 0.0
        created = self.created if self.created.tzinfo else self.created.replace(
            tzinfo=datetime.timezone.utc)
        return (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()


class VertexTuningJobs:
    def __init__(self, config: ModelConfig):
        from codeclm_beam.model.backends.google import GoogleGenAIBackend
        from codeclm_beam.model.client import transport_retrying
        # The backend owns the client, which closes its connections when collected.
        self._backend = GoogleGenAIBackend(config)
        self._tunings = self._backend.client.tunings
        self._retrying = transport_retrying(config)

    def _call(self, call):
        def once():
            try:
                with warnings.catch_warnings():
                    # google-genai marks its tuning API experimental on every call.
                    warnings.simplefilter("ignore")
                    return call()
            except Exception as e:
                raise translate_error(e) from e
        return self._retrying(once)

    def create(self, base_model: str, training_uri: str, validation_uri: Optional[str],
               hyper: Hyperparameters, display_name: str,
               labels: dict[str, str]) -> TuningJob:
        """Creates the job once. tuningJobs.create takes no idempotency key, so an
        answer lost after the service accepted the job (a connection reset) must not
        be sent again blind: before each retry the job is looked up by its labels."""
        from google.genai import types
        config = types.CreateTuningJobConfig(
            method=METHODS[hyper.method], tuned_model_display_name=display_name,
            epoch_count=hyper.epochs, learning_rate_multiplier=hyper.learning_rate_multiplier,
            adapter_size=(types.AdapterSize(ADAPTER_SIZE_NAMES[hyper.adapter_size])
                          if hyper.adapter_size else None),
            validation_dataset=(types.TuningValidationDataset(gcs_uri=validation_uri)
                                if validation_uri else None),
            labels=labels)
        sent = []

        def once():
            if sent:
                found = self._find(display_name, labels)
                if found is not None:
                    return found
            sent.append(True)
            return _job(self._tunings.tune(
                base_model=base_model,
                training_dataset=types.TuningDataset(gcs_uri=training_uri), config=config))
        return self._call(once)

    def get(self, name: str) -> TuningJob:
        return _job(self._call(lambda: self._tunings.get(name=name)))

    def cancel(self, name: str) -> None:
        self._call(lambda: self._tunings.cancel(name=name))

    def find(self, display_name: str, labels: dict[str, str]) -> Optional[TuningJob]:
        """The newest job with this display name and these labels, whatever its state
        (a failed one is reported, not created again), or None."""
        return self._call(lambda: self._find(display_name, labels))

    def _find(self, display_name: str, labels: dict[str, str]) -> Optional[TuningJob]:
        """The listing is filtered by label at the service and checked here again,
        whatever the service's filter did; where the service refuses the filter (its
        documentation promises only "the standard list filter"), it is listed whole."""
        from google.genai import errors as genai_errors
        wanted = " AND ".join(f'labels.{k}="{v}"' for k, v in sorted(labels.items()))
        try:
            listed = list(self._tunings.list(config={"filter": wanted, "page_size": 100}))
        except genai_errors.ClientError as refused:
            if refused.code != 400:
                raise
            listed = list(self._tunings.list(config={"page_size": 100}))
        jobs = [job for job in map(_job, listed) if job.display_name == display_name
                and all(job.labels.get(k) == v for k, v in labels.items())]
        return max(jobs, key=lambda job: job.created or datetime.datetime.min, default=None)


def _job(job) -> TuningJob:
    state = _value(job.state) or "JOB_STATE_UNSPECIFIED"
    error = getattr(job, "error", None)
    tuned = getattr(job, "tuned_model", None)
    spec = job.supervised_tuning_spec or job.preference_optimization_spec
    hyper = getattr(spec, "hyper_parameters", None)
    stats = getattr(job, "tuning_data_stats", None)
    stats = (getattr(stats, "supervised_tuning_data_stats", None)
             or getattr(stats, "preference_optimization_data_stats", None))
    reported = {
        "examples": getattr(stats, "tuning_dataset_example_count", None),
        "billable_tokens": getattr(stats, "total_billable_token_count", None),
        "epochs": getattr(hyper, "epoch_count", None),
        "steps": getattr(stats, "tuning_step_count", None),
    }
    return TuningJob(
        name=job.name, state=state, base_model=job.base_model,
        display_name=job.tuned_model_display_name, labels=dict(job.labels or {}),
        created=job.create_time,
        error=(excerpt(f"{error.code}: {error.message}") if error is not None else None),
        tuned_model=getattr(tuned, "model", None), endpoint=getattr(tuned, "endpoint", None),
        reported={k: (int(v) if v is not None else None) for k, v in reported.items()},
        detail=_value(getattr(job, "tuning_job_state", None)))


def _value(enum) -> Optional[str]:
    if enum is None:
        return None
    return (getattr(enum, "value", None) or str(enum)).removeprefix("TUNING_JOB_STATE_")
