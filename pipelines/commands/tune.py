"""`codeclm-beam tune RUN_DIR`: tunes a Gemini model on a run's kept pairs with a Vertex
AI tuning job, follows it, and records the tuned model in the run's folder.

    RUN_DIR/tuning/job.json          what was asked and what came of it (the record)
    RUN_DIR/tuning/job-KEY-N.json    the record of an earlier job (other data or
                                     settings, or an attempt before --new_job)
    TUNING_DIR/KEY/training.jsonl    the files the job reads (gs://; KEY names the data
    TUNING_DIR/KEY/validation.jsonl  and the settings)

A job is named by its data and settings (display name and labels). The record is
written before the job is created and completed with its name at once; a re-run follows
the recorded job, or one a killed run created but never recorded (found by its labels),
and never creates a second one for the same data and settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from typing import Any, Optional, TextIO

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.backends.vertex_tuning import ENDED
from codeclm_beam.model.backends.vertex_tuning import TuningJob
from codeclm_beam.model.backends.vertex_tuning import VertexTuningJobs
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.errors import ModelError
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.uri import ModelSpec
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.outputs import read_json
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir
from codeclm_beam.pipelines.run.commit import read_committed
from codeclm_beam.pipelines.run.outputs import write_json
from codeclm_beam.pipelines.run.outputs import write_text
from codeclm_beam.pricing import ASSUMED_DEFAULT_EPOCHS
from codeclm_beam.pricing import tuning_cost_usd
from codeclm_beam.tuning import METHODS
from codeclm_beam.tuning import RECOMMENDED_MIN_EXAMPLES
from codeclm_beam.tuning import SUPERVISED
from codeclm_beam.tuning import Hyperparameters
from codeclm_beam.tuning import training_data

_LOG = logging.getLogger(__name__)
RECORD = "job.json"


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    run_dir: str
    base_model: Optional[str] = None  # default: the run's target, when a vertex: model
    tuning_dir: Optional[str] = None  # gs://; default RUN_DIR/tuning on gs://
    hyper: Hyperparameters = Hyperparameters()
    validation_share: float = 0.0
    min_gap: float = 0.0
    project: Optional[str] = None
    location: Optional[str] = None
    base_url: Optional[str] = None
    wait: bool = True
    cancel: bool = False
    new_job: bool = False
    poll_max_s: float = 60.0


def _label_value(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower())[:63]


def tunable_base(uri: str) -> Optional[str]:
    """The model a URI names as Vertex AI's tuning names it (gemini-2.5-flash-lite),
    or None when it is no Vertex AI Gemini base model (another backend, or a tuned
    endpoint)."""
    if not uri:
        return None
    spec = ModelSpec.parse(uri if ":" in uri else f"vertex:{uri}")
    return spec.model if spec.backend == "vertex" and not spec.endpoint else None


def base_model_of(settings: TuneSettings, manifest: dict) -> str:
    """The Gemini model to tune: --base_model, else the run's target."""
    uri = settings.base_model or manifest.get("models", {}).get("target", "")
    name = tunable_base(uri)
    if name is None:
        raise ConfigurationError(
            f"tuning needs a Gemini base model on Vertex AI: give --base_model "
            f"vertex:MODEL (the run's target is {uri or 'unknown'}; an OpenAI-compatible "
            "or embedded target is tuned elsewhere: train on export/openai-*.jsonl)")
    return name


class Tuner:
    """One run's tuning: its data, its job, and the record that ties them."""

    def __init__(self, settings: TuneSettings, out: Optional[TextIO] = None):
        self.settings = settings
        self.out = out
        committed = read_committed(settings.run_dir)
        self.manifest, self.pairs_dir = committed.record, committed.path("examples")
        self.base_model = base_model_of(settings, self.manifest)
        settings.hyper.check(self.base_model)
        self.record_path = FileSystems.join(settings.run_dir, "tuning", RECORD)
        tuning_dir = settings.tuning_dir or (
            FileSystems.join(settings.run_dir, "tuning")
            if settings.run_dir.startswith("gs://") else None)
        if not str(tuning_dir or "").startswith("gs://"):
            raise ConfigurationError("give --tuning_dir gs://BUCKET/PATH: Vertex AI reads "
                                     "a tuning job's files from Cloud Storage")
        self.tuning_dir = tuning_dir
        self.jobs = VertexTuningJobs(ModelConfig(
            uri=f"vertex:{self.base_model}", project=settings.project,
            location=settings.location, base_url=settings.base_url,
            initial_backoff_s=1.0, max_backoff_s=60.0))

    # -- the data ---------------------------------------------------------------------
    def data(self):
        examples = read_jsonl_dir(self.pairs_dir)
        data = training_data(examples, self.settings.hyper.method,
                             self.settings.validation_share, self.settings.min_gap)
        problems = data.problems()
        if problems:
            raise ConfigurationError("the training data breaks Vertex AI's documented "
                                     "limits, nothing was uploaded: " + "; ".join(problems))
        if len(data.training) < RECOMMENDED_MIN_EXAMPLES:
            self._say(f"{len(data.training)} training examples: Google recommends at "
                      f"least {RECOMMENDED_MIN_EXAMPLES}")
        return data

    def job_key(self, fingerprint: str) -> str:
        """Names one job: the data, the base model and every setting."""
        settings = json.dumps([fingerprint, self.base_model,
                               dataclasses.asdict(self.settings.hyper)], sort_keys=True)
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    # -- the job ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        data = self.data()
        key = self.job_key(data.fingerprint)
        record = self._record_for(key)
        job = self._job_of(record)
        if self.settings.cancel:
            return self._cancel(record, job)
        if job is None:
            job = self._create(record, data)
        if self.settings.wait:
            job = self._follow(job)
        return self._finish(record, job)

    def _record_for(self, key: str) -> dict[str, Any]:
        previous = read_json(self.record_path) if FileSystems.exists(self.record_path) \
            else None
        if previous and previous.get("key") == key and not self.settings.new_job:
            return previous
        if previous and previous.get("job"):
            if previous.get("state") not in (None, *ENDED) and not self.settings.new_job:
                raise ConfigurationError(
                    f"tuning job {previous['job']} (other data or settings) is "
                    f"{previous.get('state')}: wait for it, or stop it with --cancel run "
                    "with its settings, or give --new_job")
            write_json(FileSystems.join(self.settings.run_dir, "tuning",
                                        f"job-{previous['key']}-"
                                        f"{previous.get('attempt', 1)}.json"), previous)
        attempt = 1 + (previous or {}).get("attempt", 0) if self.settings.new_job else 1
        run_id = str(self.manifest.get("run_id", "run"))
        return {
            "key": key, "attempt": attempt,
            "display_name": f"codeclm-{_label_value(run_id)}-{key[:8]}-{attempt}",
            "labels": {"codeclm_job": key, "codeclm_run": _label_value(run_id),
                       "codeclm_attempt": str(attempt)},
            "base_model": self.base_model, "method": self.settings.hyper.method,
            "hyperparameters": dataclasses.asdict(self.settings.hyper),
            "run_dir": self.settings.run_dir, "job": None, "state": None}

    def _job_of(self, record: dict) -> Optional[TuningJob]:
        if record.get("job"):
            return self.jobs.get(record["job"])
        # Created by a run killed before it could write the name down?
        found = self.jobs.find(record["display_name"], record["labels"])
        if found is not None:
            self._say(f"found tuning job {found.name} ({found.phase}) created for this "
                      "data by an earlier run: following it, not creating another")
            self._save(record, found)
        return found

    def _create(self, record: dict, data) -> TuningJob:
        folder = FileSystems.join(self.tuning_dir, record["key"])
        files = {"training": FileSystems.join(folder, "training.jsonl"),
                 "validation": (FileSystems.join(folder, "validation.jsonl")
                                if data.validation else None)}
        for part, path in files.items():
            if path:
                write_text(path, data.text(part), "application/jsonl")
        record.update(files=files, data_fingerprint=data.fingerprint,
                      examples={"training": len(data.training),
                                "validation": len(data.validation),
                                "skipped": data.skipped},
                      estimated_tokens_per_epoch=data.estimated_tokens)
        # Written before the job exists: a kill from here on leaves what a re-run needs
        # to find the job by its labels.
        write_json(self.record_path, record)
        job = self.jobs.create(self.base_model, files["training"], files["validation"],
                               self.settings.hyper, record["display_name"],
                               record["labels"])
        self._save(record, job)
        self._say(f"created tuning job {job.name} for {self.base_model}: "
                  f"{len(data.training)} training and {len(data.validation)} validation "
                  f"examples ({self.settings.hyper.method})")
        return job

    def _follow(self, job: TuningJob) -> TuningJob:
        """Polls until the job ends, saying where it is at each change of state and
        at least every minute (tuning takes from minutes to hours)."""
        delay, shown, shown_at = min(2.0, self.settings.poll_max_s), None, 0.0
        while not job.ended:
            state = (job.state, job.detail, tuple(job.reported.items()))
            if state != shown or time.monotonic() - shown_at >= 60:
                self._say(self._progress(job))
                shown, shown_at = state, time.monotonic()
            time.sleep(delay)
            delay = min(delay * 1.5, self.settings.poll_max_s)
            job = self.jobs.get(job.name)
        self._say(self._progress(job))
        return job

    @staticmethod
    def _progress(job: TuningJob) -> str:
        minutes, seconds = divmod(int(job.elapsed_s()), 60)
        reported = ", ".join(f"{name.replace('_', ' ')} {value:,}"
                             for name, value in job.reported.items() if value)
        return (f"tuning job {job.name.rsplit('/', 1)[-1]}: {job.phase}"
                + (f" ({job.detail.lower().replace('_', ' ')})" if job.detail
                   and not job.ended else "")
                + f", {minutes}m{seconds:02d}s" + (f", {reported}" if reported else ""))

    def _cancel(self, record: dict, job: Optional[TuningJob]) -> dict[str, Any]:
        if job is None:
            raise ConfigurationError("no tuning job of this run's data and settings to "
                                     "cancel")
        try:
            self.jobs.cancel(job.name)
        except PermanentModelError as refused:
            raise ConfigurationError(f"tuning job {job.name} was not cancelled: "
                                     f"{refused}") from None
        self._say(f"asked Vertex AI to cancel tuning job {job.name}")
        return self._finish(record, self.jobs.get(job.name))

    def _say(self, line: str) -> None:
        print(f"codeclm-beam tune: {line}", file=self.out or sys.stderr, flush=True)

    def _save(self, record: dict, job: TuningJob) -> None:
        record.update(job=job.name, state=job.state, error=job.error,
                      reported=job.reported, tuned_model=job.tuned_model,
                      endpoint=job.endpoint)
        if job.succeeded:
            record["model_uri"] = f"vertex:{self.base_model}@{job.endpoint}"
        write_json(self.record_path, record)

    def _finish(self, record: dict, job: TuningJob) -> dict[str, Any]:
        tokens = job.reported.get("billable_tokens") or record.get(
            "estimated_tokens_per_epoch") or 0
        epochs, epochs_from = job.reported.get("epochs"), "the service"
        if not epochs:
            epochs, epochs_from = record["hyperparameters"].get("epochs"), "--epochs"
        if not epochs:
            epochs, epochs_from = ASSUMED_DEFAULT_EPOCHS, (
                "assumed: the service's default, which it did not report")
        record["cost"] = {
            "usd": tuning_cost_usd(f"vertex:{self.base_model}", tokens, epochs),
            "training_tokens_per_epoch": tokens, "epochs": epochs,
            "epochs_from": epochs_from,
            "tokens_from": "the service" if job.reported.get("billable_tokens")
            else "an estimate (4 characters a token)"}
        self._save(record, job)
        return record



def summary(record: dict) -> str:
    cost = record.get("cost") or {}
    usd = cost.get("usd")
    lines = [f"codeclm-beam tune: {record['job']} {record['state']}",
             f"  base model: vertex:{record['base_model']} ({record['method']}); "
             f"examples: {record.get('examples', {}).get('training', '?')} training, "
             f"{record.get('examples', {}).get('validation', '?')} validation",
             f"  cost: {'unknown' if usd is None else f'${usd:,.4f}'} "
             f"({cost.get('training_tokens_per_epoch', 0):,} training tokens x "
             f"{cost.get('epochs') or '?'} epochs, tokens from {cost.get('tokens_from')}, "
             f"epochs from {cost.get('epochs_from', '?')})"]
    if record.get("error"):
        lines.append(f"  error: {record['error']}")
    if record.get("model_uri"):
        lines += [f"  tuned model: {record['model_uri']}",
                  "  evaluate it: codeclm-beam evaluate --benchmark EVAL.jsonl "
                  f"--candidate_model vertex:{record['base_model']} "
                  f"--candidate_model {record['model_uri']} --output_dir EVAL_DIR"]
    return "\n".join(lines)


def add_tuning_flags(parser) -> None:
    """The flags of a tuning job, for `tune` and `experiment`."""
    parser.add_argument("--method", choices=tuple(METHODS), default=SUPERVISED,
                        help="supervised (instruction -> kept answer) or preference "
                             "(the judge's preferred answer against the other).")
    parser.add_argument("--tuning_dir", default=None,
                        help="gs:// folder for the training files (default: "
                             "RUN_DIR/tuning when the run is on gs://).")
    parser.add_argument("--epochs", type=int, default=None,
                        help="Epochs (default: the service chooses).")
    parser.add_argument("--learning_rate_multiplier", type=float, default=None)
    parser.add_argument("--adapter_size", type=int, default=None,
                        help="1, 2, 4, 8 or 16 (Gemini 2.5 Pro: up to 8).")
    parser.add_argument("--validation_share", type=float, default=0.1,
                        help="Share of the pairs held out as the job's validation set.")
    parser.add_argument("--min_gap", type=float, default=0.0,
                        help="preference: only pairs the judge scored at least this far "
                             "apart.")


def settings_from(args, run_dir: str, base_model: Optional[str], **extra) -> TuneSettings:
    return TuneSettings(
        run_dir=run_dir, base_model=base_model, tuning_dir=args.tuning_dir,
        hyper=Hyperparameters(args.method, args.epochs, args.learning_rate_multiplier,
                              args.adapter_size),
        validation_share=args.validation_share, min_gap=args.min_gap,
        project=args.vertex_project, location=args.vertex_location,
        base_url=args.model_base_url, **extra)


def tune_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="A generate run's --output_dir.")
    parser.add_argument("--base_model", default=None,
                        help="vertex:MODEL to tune (default: the run's target model).")
    add_tuning_flags(parser)
    parser.add_argument("--vertex_project", default=None)
    parser.add_argument("--vertex_location", default=None)
    parser.add_argument("--model_base_url", default=None,
                        help="Endpoint override for Vertex AI (a proxy).")
    parser.add_argument("--no_wait", action="store_true",
                        help="Create (or find) the job and return.")
    parser.add_argument("--cancel", action="store_true",
                        help="Cancel this run's job for these settings.")
    parser.add_argument("--new_job", action="store_true",
                        help="Create another job even if one for this data ended.")
    parser.add_argument("--poll_seconds", type=float, default=60.0,
                        help="Longest wait between two looks at the job.")
    args = parser.parse_args(argv)
    if not 0 <= args.validation_share < 1:
        parser.error("--validation_share must lie in [0, 1)")
    try:
        record = Tuner(settings_from(
            args, args.run_dir, args.base_model, wait=not args.no_wait,
            cancel=args.cancel, new_job=args.new_job, poll_max_s=args.poll_seconds)).run()
    except ModelError as error:  # the service refused a call: its own words
        raise ConfigurationError(f"Vertex AI refused: {error}") from None
    print(summary(record))
    if args.cancel or args.no_wait:  # the job is under way, or asked to stop
        return 3 if record["state"] == "JOB_STATE_FAILED" else 0
    return 0 if record["state"] == "JOB_STATE_SUCCEEDED" else 3

