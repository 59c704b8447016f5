"""Contract test: `codeclm-beam jobs` against a loopback server that speaks the Dataflow
v1beta3 REST API, driven through the real google-cloud-dataflow-client (REST
transport)."""
import datetime
import re

import pytest
from google.cloud import dataflow_v1beta3 as dataflow

from codeclm_beam.pipelines.cli import main
from tests.loopback import RecordingServer

PREFIX = "/v1b3/projects/proj-1/locations/europe-west4/jobs"


def stamp(minutes_ago):
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        minutes=minutes_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def job_json(job_id, state):
    return {"id": job_id, "projectId": "proj-1", "name": f"codeclm-{job_id}",
            "type": "JOB_TYPE_BATCH", "currentState": state,
            "createTime": stamp(20), "startTime": stamp(20),
            "currentStateTime": stamp(1), "location": "europe-west4",
            "environment": {"sdkPipelineOptions": {"options": {"num_examples": 200}}}}


def counter(namespace, name, value, tentative=False, step="s1"):
    context = {"namespace": namespace, "step": step}
    if tentative:
        context["tentative"] = "true"
    return {"name": {"origin": "user", "name": name, "context": context},
            "scalar": value, "updateTime": "2026-11-22T10:19:00Z"}


def dataflow_api(state):
    def respond(method, path, body, headers):
        path = path.split("?")[0]
        if method == "GET" and path == PREFIX:
            return 200, {"jobs": [job_json("job-a", "JOB_STATE_RUNNING"),
                                  job_json("job-b", "JOB_STATE_DONE")]}, {}
        match = re.fullmatch(PREFIX + r"/([\w-]+)(/metrics)?", path)
        if not match:
            return 404, {"error": {"code": 404, "message": path, "status": "NOT_FOUND"}}, {}
        job_id = match.group(1)
        if match.group(2):
            return 200, {"metricTime": "2026-11-22T10:19:00Z", "metrics": [
                counter("codeclm/flow", "round1.kept", 90),
                counter("codeclm/flow", "round2.kept", 30, step="s2"),
                counter("codeclm/flow", "round2.kept", 99, tentative=True),
                counter("codeclm/judge/vertex:gemini", "requests", 500),
                counter("codeclm/answer_strong/vertex:gemini", "requests", 250),
                counter("codeclm/judge/vertex:gemini", "prompt_tokens", 123456),
                counter("codeclm/judge/vertex:gemini", "cached_prompt_tokens", 2048),
                counter("codeclm/judge/vertex:gemini", "completion_tokens", 700),
                counter("codeclm/judge/vertex:gemini", "thoughts_tokens", 64000),
                counter("codeclm/judge/vertex:gemini", "truncated", 3),
                counter("codeclm/judge/vertex:gemini", "throttled_ms", 4500),
                counter("codeclm/dead_letter", "judge", 2),
                {"name": {"origin": "dataflow/v1b3", "name": "ElementCount",
                          "context": {"step": "s1"}}, "scalar": 999},
            ]}, {}
        if method == "PUT":
            state["cancel_body"] = body
            return 200, job_json(job_id, "JOB_STATE_CANCELLING"), {}
        polls = state["polls"] = state.get("polls", 0) + 1
        return 200, job_json(job_id, "JOB_STATE_RUNNING" if polls < 3
                             else "JOB_STATE_DONE"), {}
    return respond


@pytest.fixture
def api():
    state = {}
    server = RecordingServer(dataflow_api(state))
    with server.running():
        yield server, state


def run_jobs(server, *args):
    return main(["jobs", *args, "--project", "proj-1", "--region", "europe-west4",
                 "--dataflow_endpoint", server.base_url])


def test_list(api, capsys):
    server, _ = api
    assert run_jobs(server, "list") == 0
    out = capsys.readouterr().out
    assert "job-a" in out and "JOB_STATE_RUNNING" in out and "job-b" in out
    assert server.requests[0]["path"].startswith(PREFIX)


def test_status_shows_counters_and_progress(api, capsys):
    server, _ = api
    assert run_jobs(server, "status", "job-a") == 0
    out = capsys.readouterr().out
    assert "JOB_STATE_RUNNING" in out and "elapsed: 0:20:0" in out
    assert "120/200" in out and "60%" in out  # 90 + 30 committed kept of 200 wanted
    assert "750 requests" in out and "123456 prompt (of which 2048 cached)" in out
    assert "700 visible output + 64000 thoughts (billed as output)" in out
    assert "truncated answers dead-lettered: 3" in out
    assert "throttled: 4.5 s" in out and "dead letters: 2" in out
    get = next(r for r in server.requests if r["path"].split("?")[0] == PREFIX + "/job-a")
    assert f"view={dataflow.JobView.JOB_VIEW_ALL.value}" in get["path"]


def test_watch_refreshes_until_the_job_ends(api, capsys):
    server, state = api
    assert run_jobs(server, "status", "job-a", "--watch", "--interval", "0.01") == 0
    out = capsys.readouterr().out
    assert out.count("state: JOB_STATE_RUNNING") == 2
    assert out.count("state: JOB_STATE_DONE") == 1


def test_cancel(api, capsys):
    server, state = api
    assert run_jobs(server, "cancel", "job-a") == 0
    assert state["cancel_body"]["requestedState"] in (
        "JOB_STATE_CANCELLED", dataflow.JobState.JOB_STATE_CANCELLED.value)
    assert "JOB_STATE_CANCELLING" in capsys.readouterr().out
