"""Contract tests: `codeclm-beam tune` and `experiment` through the real google-genai
client (`client.tunings.tune/get/list/cancel`) against the loopback Vertex AI server,
which speaks `tuningJobs` REST as Vertex AI documents it (JSONL on Cloud Storage, read
and checked line by line by the job; states pending -> running -> succeeded / failed /
cancelled; errors as the service returns them; the tuned model deployed to an endpoint
that answers generateContent), with Cloud Storage served by a real emulator on loopback.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from apache_beam.io.filesystems import FileSystems

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse
from codeclm_beam.pipelines.cli import main
from codeclm_beam.pricing import ASSUMED_DEFAULT_EPOCHS
from codeclm_beam.pipelines.run.outputs import read_json
from codeclm_beam.tuning import preference_row
from codeclm_beam.tuning import supervised_row
from tests.helpers import ANONYMOUS_GCS

def a_run(tmp_path, pairs: int = 12, target: str = "vertex:gemini-2.5-flash-lite") -> str:
    """A generate run's folder as `tune` reads it: its manifest and kept pairs."""
    run = tmp_path / "run"
    (run / "examples").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "run_id": "pilot01", "models": {"strong": "vertex:gemini-2.5-flash",
                                        "target": target}}))
    rows = [{"example_id": f"e{i:02d}", "instruction": f"Explain topic {i} in two lines.",
             "response": f"Topic {i} is explained well here.", "response_source": "strong",
             "other_response": f"Topic {i}? Not sure." if i % 3 else None,
             "gap": 7.0 if i % 2 else 2.0} for i in range(pairs)]
    (run / "examples" / "examples-00000-of-00001.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    return str(run)


def tune(server, run, *flags, tuning_dir="gs://codeclm-test/tuning"):
    return main(["tune", run, "--tuning_dir", tuning_dir, "--model_base_url",
                 server.base_url, "--poll_seconds", "0.2", *flags])


def creates(server) -> int:
    return [call for call, _ in server.tuning_calls].count("POST")


def test_tune_uploads_the_pairs_follows_the_job_and_records_the_tuned_model(
        cloud, tmp_path, capsys):
    run = a_run(tmp_path)
    with FakeModelServer(ServerConfig()) as server:
        assert tune(server, run, "--epochs", "2", "--adapter_size", "4",
                    "--validation_share", "0.25") == 0
        job = next(iter(server.tuning_jobs.values()))
        record = read_json(os.path.join(run, "tuning", "job.json"))
        # A second run follows the recorded job: no job created, nothing paid again.
        assert tune(server, run, "--epochs", "2", "--adapter_size", "4",
                    "--validation_share", "0.25") == 0
        assert creates(server) == 1
        # The tuned model answers at its endpoint, under its own identity.
        tuned = ModelConfig(uri=record["model_uri"], base_url=server.base_url)
        base = ModelConfig(uri="vertex:gemini-2.5-flash-lite", base_url=server.base_url)
        answer = ModelClient(tuned).call(ModelRequest.create(
            "q", [ChatMessage("user", "Explain topic 3.")], GenerationSettings(seed=1)))
        paths = [e for e in server.log if e["outcome"] == "ok"]
    assert isinstance(answer, ModelResponse) and answer.text.startswith("[model=tuned/")
    assert paths[-1]["model"].startswith("tuned/") and tuned.identity != base.identity
    # The job as google-genai created it, from the files tune wrote on Cloud Storage.
    spec = job["supervisedTuningSpec"]
    assert job["baseModel"] == "gemini-2.5-flash-lite"
    assert spec["hyperParameters"]["adapterSize"] == "ADAPTER_SIZE_FOUR"
    assert int(spec["hyperParameters"]["epochCount"]) == 2
    assert job["labels"]["codeclm_job"] == record["key"]
    with FileSystems.open(spec["trainingDatasetUri"]) as f:
        training = [json.loads(line) for line in f.read().decode().splitlines()]
    with FileSystems.open(spec["validationDatasetUri"]) as f:
        validation = [json.loads(line) for line in f.read().decode().splitlines()]
    assert len(training) + len(validation) == 12 and validation and training
    assert supervised_row("Explain topic 0 in two lines.",
                          "Topic 0 is explained well here.") in training + validation
    assert record["state"] == "JOB_STATE_SUCCEEDED" and record["endpoint"] in \
        record["model_uri"] and record["model_uri"].startswith("vertex:gemini-2.5-flash-lite@")
    # Priced from the tokens the service billed, times the epochs, at Flash-Lite's rate.
    billable = int(job["tuningDataStats"]["supervisedTuningDataStats"]
                   ["totalBillableTokenCount"])
    assert record["cost"]["training_tokens_per_epoch"] == billable
    assert record["cost"]["epochs_from"] == "the service"
    assert record["cost"]["usd"] == pytest.approx(billable * 2 * 1.5 / 1e6, abs=1e-4)
    shown = capsys.readouterr()
    assert "pending" in shown.err and "succeeded" in shown.err
    assert record["model_uri"] in shown.out


def test_a_job_created_but_never_recorded_is_found_by_its_labels(cloud, tmp_path):
    run = a_run(tmp_path)
    config = ServerConfig(tuning_pending_seconds=1.0, tuning_reports_picked=False)
    with FakeModelServer(config) as server:
        assert tune(server, run, "--no_wait") == 0
        path = os.path.join(run, "tuning", "job.json")
        record = read_json(path)
        # As if killed after creating the job, before recording its name.
        record.update(job=None, state=None)
        with open(path, "w") as f:
            json.dump(record, f)
        assert tune(server, run) == 0
        assert creates(server) == 1 and ("GET", "") in server.tuning_calls
        job = next(iter(server.tuning_jobs.values()))
    record = read_json(path)
    assert record["state"] == "JOB_STATE_SUCCEEDED"
    # No --epochs and the service did not say what it chose: priced at the assumed
    # default, and the record says it is assumed.
    assert "epochCount" not in job["supervisedTuningSpec"]["hyperParameters"]
    billable = int(job["tuningDataStats"]["supervisedTuningDataStats"]
                   ["totalBillableTokenCount"])
    assert record["cost"]["epochs"] == 5
    assert record["cost"]["epochs_from"].startswith("assumed")
    assert record["cost"]["usd"] == pytest.approx(billable * 5 * 1.5 / 1e6, abs=1e-4)


def test_a_create_whose_answer_is_lost_makes_one_job_and_a_failed_one_is_reported(
        cloud, tmp_path):
    run = a_run(tmp_path)
    config = ServerConfig(tuning_create_resets=1, tuning_list_filter_refused=True,
                          tuning_fault="fail")
    with FakeModelServer(config) as server:
        assert tune(server, run) == 3  # the one job, found by its labels, failed
        assert creates(server) == 1
        # A re-run finds the failed job by its labels again: reported, not recreated.
        record = read_json(os.path.join(run, "tuning", "job.json"))
        record.update(job=None, state=None)
        with open(os.path.join(run, "tuning", "job.json"), "w") as f:
            json.dump(record, f)
        assert tune(server, run) == 3
        assert creates(server) == 1


def test_cancel_stops_the_job_and_a_failed_job_is_not_paid_for_twice(cloud, tmp_path,
                                                                    capsys):
    run = a_run(tmp_path)
    with FakeModelServer(ServerConfig(tuning_fault="stuck")) as server:
        assert tune(server, run, "--no_wait") == 0
        assert tune(server, run, "--cancel") == 0
        # Following it now sees it end cancelled: exit 3, and no new job.
        assert tune(server, run) == 3
        assert creates(server) == 1 and ("POST:cancel", "7000") in server.tuning_calls
        assert read_json(os.path.join(run, "tuning", "job.json"))["state"] == \
            "JOB_STATE_CANCELLED"
        # Cancelling an ended job: the service's refusal, in its words.
        assert main(["tune", run, "--tuning_dir", "gs://codeclm-test/tuning",
                     "--model_base_url", server.base_url, "--cancel"]) == 2
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
        server.config.tuning_fault = "fail"
        assert tune(server, run, "--new_job") == 3
        assert creates(server) == 2
    record = read_json(os.path.join(run, "tuning", "job.json"))
    assert record["attempt"] == 2 and "Internal error" in record["error"]
    assert os.path.exists(os.path.join(run, "tuning", f"job-{record['key']}-1.json"))


def test_preference_data_and_what_is_refused_before_and_by_the_service(cloud, tmp_path,
                                                                       capsys):
    run = a_run(tmp_path)
    with FakeModelServer(ServerConfig()) as server:
        # Preference pairs: chosen the kept answer, rejected the other model's; the
        # pairs without one or under --min_gap are left out and counted.
        assert tune(server, run, "--method", "preference", "--min_gap", "5",
                    "--validation_share", "0") == 0
        job = next(iter(server.tuning_jobs.values()))
        record = read_json(os.path.join(run, "tuning", "job.json"))
        with FileSystems.open(job["preferenceOptimizationSpec"]["trainingDatasetUri"]) as f:
            rows = [json.loads(line) for line in f.read().decode().splitlines()]
        assert preference_row("Explain topic 1 in two lines.",
                              "Topic 1 is explained well here.",
                              "Topic 1? Not sure.") in rows
        # Odd pairs have the gap; a third of them have no other answer (0, 3, 6, 9).
        assert len(rows) == 4 and sum(record["examples"]["skipped"].values()) == 8
        # No --epochs: the cost uses the epochs the service reported it picked.
        assert (record["cost"]["epochs"], record["cost"]["epochs_from"]) == (
            4, "the service")
        # The service takes preference tuning on Flash only: its 400, in its words.
        assert tune(server, run, "--method", "preference", "--base_model",
                    "vertex:gemini-2.5-pro") == 2
        assert "not supported" in capsys.readouterr().err
        # An example over the documented token limit: refused before any upload.
        long_run = a_run(tmp_path / "long")
        rows = open(os.path.join(long_run, "examples", "examples-00000-of-00001.jsonl")
                    ).read().splitlines()
        first = json.loads(rows[0])
        first["response"] = "word " * 110_000
        rows[0] = json.dumps(first)
        with open(os.path.join(long_run, "examples", "examples-00000-of-00001.jsonl"),
                  "w") as f:
            f.write("\n".join(rows) + "\n")
        before = creates(server)
        assert tune(server, long_run, tuning_dir="gs://codeclm-test/long") == 2
        assert "131,072 tokens" in capsys.readouterr().err and creates(server) == before
        assert not FileSystems.match(["gs://codeclm-test/long/**"])[0].metadata_list
        # An OpenAI-compatible target is tuned elsewhere: said before anything is done.
        other = a_run(tmp_path / "openai", target="openai:llama@http://127.0.0.1:9/v1")
        assert tune(server, other) == 2
        assert "export/openai" in capsys.readouterr().err


def a_benchmark(tmp_path, rows: int = 10) -> str:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({
        "question_id": i, "category": ("writing", "coding")[i % 2],
        "turns": [f"Question {i}: how would you {('write', 'code')[i % 2]} thing {i}?"]})
        + "\n" for i in range(rows)))
    return str(path)


def experiment_flags(server, benchmark, out, *extra):
    return ["--benchmark", benchmark, "--output_dir", str(out), "--seed_fraction", "0.4",
            "--strong_model", "vertex:gemini-2.5-flash",
            "--target_model", "vertex:gemini-2.5-flash-lite",
            "--model_base_url", server.base_url, "--tuning_dir", "gs://codeclm-test/exp",
            "--poll_seconds", "0.2", "--validation_share", "0", "--epochs", "2",
            "--num_examples", "3", "--num_metadata", "2", "--max_iterations", "2",
            "--no_report", "--quiet", *extra]


def model_calls(server) -> int:
    return sum(1 for e in server.log if e["outcome"] == "ok")


def test_an_experiment_killed_while_tuning_resumes_and_pays_for_nothing_twice(
        cloud, tmp_path, capsys):
    benchmark, out = a_benchmark(tmp_path), tmp_path / "exp"
    config = ServerConfig(accept_rate=0.5, strong_model="gemini-2.5-flash",
                          tuning_pending_seconds=120, tuned_recovery=1.0,
                          max_seconds=400)
    with FakeModelServer(config) as server:
        flags = experiment_flags(server, benchmark, out)
        first = subprocess.Popen([sys.executable, "-c", ANONYMOUS_GCS, "experiment", *flags],
                                 env=dict(os.environ), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        record = out / "generate" / "tuning" / "job.json"
        try:
            deadline = time.time() + 240
            while not (record.exists() and read_json(str(record)).get("job")):
                assert time.time() < deadline and first.poll() is None
                time.sleep(0.2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        generated = model_calls(server)
        assert generated and [j["state"] for j in server.tuning_jobs.values()] == [
            "JOB_STATE_PENDING"]
        server.config.tuning_pending_seconds = 0.2
        capsys.readouterr()
        assert main(["experiment", *flags]) == 0
        report = capsys.readouterr().out
        after_resume = model_calls(server)
        # A third run finds every step done: no model call, no job, nothing paid.
        assert main(["experiment", *flags]) == 0
        assert model_calls(server) == after_resume and creates(server) == 1
        evaluate_calls = [e for e in server.log[generated:] if e["outcome"] == "ok"]
    steps = read_json(str(out / "experiment.json"))["steps"]
    # Generate ran once (in the killed run) and was not run again; one tuning job.
    assert steps["generate"]["runs"] == 1 and steps["tune"]["runs"] == 2
    assert steps["evaluate"]["runs"] == 1 and steps["split"]["runs"] == 1
    assert len(server.tuning_jobs) == 1
    summary = read_json(str(out / "evaluate" / "summary.json"))
    base, tuned = summary["candidates"]
    assert tuned["candidate_model"].startswith("vertex:gemini-2.5-flash-lite@projects/")
    # The resumed run's calls: evaluation only (6 held-out items: a reference answer,
    # then per candidate an answer and two judgements), some at the tuned endpoint.
    assert len(evaluate_calls) == 6 * (1 + 3 * 2)
    assert sum(e["model"].startswith("tuned/") for e in evaluate_calls) == 6
    diff = summary["differences"][0]
    assert diff["difference"] == pytest.approx(
        tuned["overall"]["crr"] - base["overall"]["crr"], abs=0.01)
    assert diff["difference"] > 0 and diff["ci95_low"] <= diff["difference"]
    assert "ΔCRR" in report and f"{diff['difference']:+.2f}" in report
    assert "tuning $" in report and "| tune | done | 2 |" in report
    # `plan` prices tuning 1,000 such pairs at the pilot's tokens per pair.
    capsys.readouterr()
    assert main(["plan", str(out / "generate"), "--num_examples", "1000", "--json",
                 "--tune_base_model", "vertex:gemini-2.5-flash-lite"]) == 0
    tuning = json.loads(capsys.readouterr().out)["tuning"]
    pairs = [json.loads(line) for path in (out / "generate" / "examples").glob("*.jsonl")
             for line in path.read_text().splitlines()]
    per_pair = sum(math.ceil((len(p["instruction"]) + len(p["response"])) / 4)
                   for p in pairs) / len(pairs)
    assert tuning["training_tokens_per_epoch"] == round(1000 * per_pair)
    assert tuning["cost_usd"] == pytest.approx(
        tuning["training_tokens_per_epoch"] * ASSUMED_DEFAULT_EPOCHS * 1.5 / 1e6,
        abs=1e-4)


def test_a_dataset_the_service_refuses_fails_the_job_saying_which_line_and_why(cloud):
    from codeclm_beam.model.backends.vertex_tuning import VertexTuningJobs
    from codeclm_beam.pipelines.run.outputs import write_text
    from codeclm_beam.tuning import Hyperparameters
    good = json.dumps(supervised_row("Name a colour.", "Blue."))
    # Ends with the user's turn: no answer to learn.
    bad = json.dumps({"contents": [{"role": "user", "parts": [{"text": "Hi?"}]}]})
    write_text("gs://codeclm-test/refused/training.jsonl", f"{good}\n{bad}\n")
    with FakeModelServer(ServerConfig()) as server:
        jobs = VertexTuningJobs(ModelConfig(uri="vertex:gemini-2.5-flash",
                                            base_url=server.base_url))
        job = jobs.create("gemini-2.5-flash", "gs://codeclm-test/refused/training.jsonl",
                          None, Hyperparameters(), "refused", {"codeclm_job": "x"})
        while not job.ended:
            time.sleep(0.1)
            job = jobs.get(job.name)
    assert job.state == "JOB_STATE_FAILED" and not job.succeeded
    assert "line 2" in job.error and "model's turn" in job.error


def test_an_experiment_with_an_openai_target_stops_after_generate_with_next_steps(
        tmp_path):
    benchmark, out = a_benchmark(tmp_path, rows=6), tmp_path / "exp"
    with FakeModelServer(ServerConfig(accept_rate=0.5)) as server:
        url = f"{server.base_url}/v1"
        assert main(["experiment", "--benchmark", benchmark, "--output_dir", str(out),
                     "--seed_fraction", "0.5", "--strong_model", f"openai:strong@{url}",
                     "--target_model", f"openai:target@{url}", "--num_examples", "2",
                     "--num_metadata", "2", "--max_iterations", "2", "--no_report",
                     "--quiet"]) == 0
        assert not server.tuning_calls
    steps = read_json(str(out / "experiment.json"))["steps"]
    assert set(steps) == {"split", "generate"}
    next_steps = (out / "NEXT_STEPS.md").read_text()
    exports = list((out / "generate" / "export").glob("openai-*.jsonl"))
    assert exports and exports[0].read_text().strip()
    from codeclm_beam.pipelines.run.commit import read_committed
    assert read_committed(str(out / "generate")).path("export") in next_steps
    assert f"--benchmark {out / 'split' / 'bench.eval.jsonl'}" in next_steps
    assert f"--candidate_model openai:target@{url}" in next_steps


def test_a_tuned_endpoint_uri_is_its_own_model_priced_as_its_base():
    from codeclm_beam.model.errors import ConfigurationError
    from codeclm_beam.model.uri import ModelSpec
    from codeclm_beam.pricing import DEFAULT_PRICES
    from codeclm_beam.pricing import price_of
    endpoint = "projects/p/locations/europe-west4/endpoints/42"
    tuned = ModelConfig(uri=f"vertex:gemini-2.5-flash-lite@{endpoint}", vertex_mode="flex")
    bare = ModelSpec.parse(f"vertex:{endpoint}")
    assert tuned.spec.endpoint == endpoint and tuned.spec.endpoint_location == "europe-west4"
    assert tuned.identity != ModelConfig(uri="vertex:gemini-2.5-flash-lite").identity
    assert bare.identity != tuned.identity and bare.model == endpoint
    # Flex PayGo and batch serve published models: a tuned endpoint is called online.
    assert tuned.billing_mode == "online"
    assert price_of(tuned.identity, DEFAULT_PRICES) == \
        DEFAULT_PRICES["vertex:gemini-2.5-flash-lite"]
    assert price_of(bare.identity, DEFAULT_PRICES) is None
    for wrong in ("vertex:gemini-2.5-flash@projects/p/models/7",
                  "vertex:@projects/p/locations/l/endpoints/1"):
        with pytest.raises(ConfigurationError, match="endpoints/E"):
            ModelSpec.parse(wrong)


def test_a_tuned_flash_endpoint_gets_room_to_think_as_its_base(cloud, tmp_path):
    run = a_run(tmp_path, target="vertex:gemini-2.5-flash")
    with FakeModelServer(ServerConfig()) as server:
        assert tune(server, run) == 0
        record = read_json(os.path.join(run, "tuning", "job.json"))
        answers = {}
        for name, uri in (("base", "vertex:gemini-2.5-flash"),
                          ("tuned", record["model_uri"])):
            client = ModelClient(ModelConfig(uri=uri, base_url=server.base_url))
            answers[name] = [client.call(ModelRequest.create(
                f"q{i}", [ChatMessage("user", f"Explain topic {i} in detail.")],
                GenerationSettings(seed=i))) for i in range(4)]
        sent = {e["model"].split("/")[0]: e["max_tokens"] for e in server.log
                if e["outcome"] == "ok"}
    # The default visible budget (1,024) plus the base model's room for thought.
    assert sent["tuned"] == sent["gemini-2.5-flash"] > 1024
    for answer in answers["tuned"]:
        assert isinstance(answer, ModelResponse) and answer.finish_reason == "STOP"
        assert answer.usage.thoughts_tokens > 0  # it thought, as its base does
