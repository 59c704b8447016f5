"""`codeclm-beam jobs list | status JOB_ID | cancel JOB_ID`: watching Dataflow jobs
through google-cloud-dataflow-client (the Dataflow v1beta3 API).

`status` shows the job's state and elapsed time, the pipeline's own counters (kept pairs,
model calls, tokens, throttled seconds, dead letters) and a progress bar toward
`--num_examples`, refreshing until the job ends with `--watch`.
"""
from __future__ import annotations

import collections
import datetime
import os
import sys
import time
from typing import Any, Callable, Optional

from google.cloud import dataflow_v1beta3 as dataflow
from codeclm_beam.metrics import RunCounters
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.args import SuggestingParser

TERMINAL_STATES = {"JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                   "JOB_STATE_UPDATED", "JOB_STATE_DRAINED", "JOB_STATE_STOPPED"}


def make_clients(endpoint: Optional[str] = None) -> tuple[Any, Any]:
    """Jobs and metrics clients over REST. An explicit http:// endpoint (a proxy or a
    loopback test server) is used without credentials; otherwise Application Default
    Credentials and the public endpoint."""
    from google.api_core.client_options import ClientOptions

    from google.auth import exceptions

    kwargs: dict[str, Any] = {"transport": "rest"}
    if endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
        if endpoint.startswith("http://"):
            from google.auth.credentials import AnonymousCredentials
            kwargs["credentials"] = AnonymousCredentials()
    try:
        return (dataflow.JobsV1Beta3Client(**kwargs),
                dataflow.MetricsV1Beta3Client(**kwargs))
    except exceptions.DefaultCredentialsError:
        raise ConfigurationError(
            "the Dataflow API needs Google Cloud credentials, and none were found: run "
            "`gcloud auth application-default login`, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None


def _state(job) -> str:
    return dataflow.JobState(job.current_state).name


def _elapsed(job, now: Optional[datetime.datetime] = None) -> float:
    start = job.start_time or job.create_time
    if not start:
        return 0.0
    end = job.current_state_time if _state(job) in TERMINAL_STATES else None
    end = end or now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (end - start).total_seconds())


def user_counters(job_metrics) -> dict[tuple[str, str], float]:
    """Committed user counters summed over steps: {(namespace, name): value}."""
    totals: dict[tuple[str, str], float] = collections.defaultdict(float)
    for update in job_metrics.metrics:
        if update.name.origin != "user":
            continue
        context = dict(update.name.context)
        if context.get("tentative") == "true":
            continue
        value = update.scalar
        if isinstance(value, (int, float)):
            totals[(context.get("namespace", ""), update.name.name)] += value
    return dict(totals)


def _num_examples_option(job) -> Optional[int]:
    environment = job.environment
    options = environment.sdk_pipeline_options if environment else None
    try:
        value = dict(dict(options or {}).get("options", {})).get("num_examples")
    except (TypeError, ValueError):
        return None
    return int(value) if value not in (None, "") else None


def render_status(job, counters: dict[str, float],
                  num_examples: Optional[int] = None) -> str:
    from tqdm import tqdm

    elapsed = _elapsed(job)
    lines = [f"job {job.id} ({job.name})", f"  state: {_state(job)}",
             f"  elapsed: {datetime.timedelta(seconds=int(elapsed))}"]
    kept = int(counters.get("examples_written") or counters.get("kept_pairs", 0))
    target = num_examples or _num_examples_option(job)
    if target:
        lines.append("  " + tqdm.format_meter(min(kept, target), target, elapsed,
                                              ncols=70, prefix="kept pairs",
                                              unit="pair"))
    else:
        lines.append(f"  kept pairs: {kept}")
    lines.append(
        f"  model calls: {int(counters.get('requests', 0))} requests, "
        f"{int(counters.get('cache_hits', 0))} cache hits, "
        f"{int(counters.get('retries', 0))} retries, "
        f"{int(counters.get('failures', 0))} failures")
    lines.append(f"  tokens: {int(counters.get('prompt_tokens', 0))} prompt (of which "
                 f"{int(counters.get('cached_prompt_tokens', 0))} cached) + "
                 f"{int(counters.get('completion_tokens', 0))} visible output + "
                 f"{int(counters.get('thoughts_tokens', 0))} thoughts (billed as output)")
    lines.append(f"  truncated answers dead-lettered: {int(counters.get('truncated', 0))}")
    jobs = int(counters.get("batch_jobs", 0))
    if jobs:
        ended = int(counters.get("batch_jobs_ended", 0))
        failed = int(counters.get("batch_jobs_failed", 0))
        lines.append(f"  batch prediction jobs: {jobs} ({jobs - ended} pending or "
                     f"running, {ended - failed} finished, {failed} failed, cancelled "
                     f"or expired); waited {counters.get('batch_wait_seconds', 0):.0f} s")
    lines.append(f"  throttled: {counters.get('throttled_seconds', 0):.1f} s; "
                 f"dead letters: {int(counters.get('dead_letters', 0))}")
    return "\n".join(lines)


class DataflowJobs:
    def __init__(self, project: str, region: str, jobs_client, metrics_client):
        self._project = project
        self._region = region
        self._jobs = jobs_client
        self._metrics = metrics_client

    def list(self) -> list:
        request = dataflow.ListJobsRequest(project_id=self._project, location=self._region)
        return list(self._jobs.list_jobs(request=request))

    def get(self, job_id: str):
        return self._jobs.get_job(request=dataflow.GetJobRequest(
            project_id=self._project, location=self._region, job_id=job_id,
            view=dataflow.JobView.JOB_VIEW_ALL))

    def counters(self, job_id: str) -> dict[str, float]:
        metrics = self._metrics.get_job_metrics(request=dataflow.GetJobMetricsRequest(
            project_id=self._project, location=self._region, job_id=job_id))
        return RunCounters.from_pairs(user_counters(metrics).items()).summary()

    def cancel(self, job_id: str):
        return self._jobs.update_job(request=dataflow.UpdateJobRequest(
            project_id=self._project, location=self._region, job_id=job_id,
            job=dataflow.Job(requested_state=dataflow.JobState.JOB_STATE_CANCELLED)))

    def watch(self, job_id: str, num_examples: Optional[int], interval: float,
              emit: Callable[[str], None], max_polls: Optional[int] = None) -> str:
        polls = 0
        while True:
            job = self.get(job_id)
            emit(render_status(job, self.counters(job_id), num_examples))
            polls += 1
            if _state(job) in TERMINAL_STATES or (max_polls and polls >= max_polls):
                return _state(job)
            time.sleep(interval)


def jobs_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam jobs",
                                     description="Dataflow jobs: list, status, cancel.")
    parser.add_argument("action", choices=("list", "status", "cancel"))
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    parser.add_argument("--region", default=os.environ.get("GOOGLE_CLOUD_REGION",
                                                           "us-central1"))
    parser.add_argument("--num_examples", type=int, default=None,
                        help="Progress target (default: the job's --num_examples).")
    parser.add_argument("--watch", action="store_true",
                        help="Refresh status until the job ends.")
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--dataflow_endpoint",
                        default=os.environ.get("CODECLM_DATAFLOW_ENDPOINT"),
                        help="API endpoint override (a proxy, or a loopback test server).")
    args = parser.parse_args(argv)
    if not args.project:
        parser.error("give --project (or set GOOGLE_CLOUD_PROJECT)")
    if args.action != "list" and not args.job_id:
        parser.error(f"'{args.action}' needs a JOB_ID")
    jobs = DataflowJobs(args.project, args.region, *make_clients(args.dataflow_endpoint))
    if args.action == "list":
        for job in jobs.list():
            print(f"{job.id}  {_state(job):22}  {job.name}")
        return 0
    if args.action == "cancel":
        job = jobs.cancel(args.job_id)
        print(f"cancel requested for {args.job_id}: {_state(job)}")
        return 0
    if args.watch:
        final = jobs.watch(args.job_id, args.num_examples, args.interval,
                           lambda text: print(text + "\n", flush=True))
        return 0 if final == "JOB_STATE_DONE" else 1
    print(render_status(jobs.get(args.job_id), jobs.counters(args.job_id),
                        args.num_examples))
    return 0


if __name__ == "__main__":
    sys.exit(jobs_command(sys.argv[1:]))
