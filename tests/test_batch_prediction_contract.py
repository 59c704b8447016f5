"""Contract tests: --vertex_mode batch through the real google-genai client
(`client.batches.create/get/cancel`) against the loopback Vertex AI server, which speaks
`batchPredictionJobs` REST as Vertex AI documents it (JSONL input and output on Cloud
Storage; states pending -> running -> succeeded / partially succeeded / failed;
per-line error `status`; cancel keeps the finished lines), with Cloud Storage served
by a real emulator (gcp-storage-emulator) on loopback.

The fault tests drive the stage's job runner (`_RunJobs`, the DoFn a pipeline runs)
on a few requests; the end-to-end tests run `generate`."""
import collections
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
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model.batch import _RunJobs
from codeclm_beam.model.config import BatchConfig
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.pipelines.run.manifest import billing_modes
from codeclm_beam.pipelines.commands.plan import Pilot
from codeclm_beam.pipelines.commands.plan import plan
from codeclm_beam.pipelines.commands.plan import render
from tests.helpers import ANONYMOUS_GCS
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import write_seeds

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}},
          "required": ["answer"]}


def _config(server, batch_dir, **batch) -> ModelConfig:
    return ModelConfig(uri="vertex:gemini-2.5-flash-lite", base_url=server.base_url,
                       vertex_mode="batch", max_retries=1, initial_backoff_s=0.05,
                       batch=BatchConfig(batch_dir=batch_dir, poll_initial_s=0.05,
                                         poll_max_s=0.2, **batch))


def _ask(config, n=6):
    """Runs n requests through the batch job runner; results by request id."""
    requests = [ModelRequest.create(
        f"r{i}", [ChatMessage("user", f"Question {i}: name a colour.")],
        GenerationSettings(max_output_tokens=200, seed=i), SCHEMA) for i in range(n)]
    runner = _RunJobs(config, "answer_target")
    runner.setup()
    return {prediction.example.request_id: prediction.inference
            for _, prediction in runner.process((0, [
                (r.cache_key(config.identity), (r.request_id, r)) for r in requests]))}


def _failures(results):
    return {rid: r for rid, r in results.items() if isinstance(r, ModelFailure)}


def test_a_job_that_fails_outright_dead_letters_each_element_with_the_jobs_error(cloud):
    with FakeModelServer(ServerConfig(batch_fault="fail")) as server:
        results = _ask(_config(server, "gs://codeclm-test/fail"))
    assert len(results) == 6 and set(_failures(results)) == set(results)
    failure = results["r0"]
    assert "JOB_STATE_FAILED" in failure.message and "Internal error" in failure.message
    # Its own reason: not a refusal of the request (a 4xx), which "refused" is.
    assert failure.reason == "batch_failed" and failure.attempts == 0
    assert server.usage == {}  # nothing answered, nothing billed


def test_a_partly_successful_job_keeps_its_answers_and_dead_letters_its_error_lines(cloud):
    with FakeModelServer(ServerConfig(batch_fault="partial",
                                      batch_line_error_rate=0.5)) as server:
        results = _ask(_config(server, "gs://codeclm-test/partial"))
    failed = _failures(results)
    answered = {rid: r for rid, r in results.items() if isinstance(r, ModelResponse)}
    assert failed and answered and len(failed) + len(answered) == 6
    assert all("INVALID_ARGUMENT" in f.message and "JOB_STATE_PARTIALLY_SUCCEEDED"
               in f.message for f in failed.values())
    assert all(r.data["answer"] for r in answered.values())
    # One job: the error lines are not asked again (the job said why they failed).
    assert [call for call, _ in server.batch_calls].count("POST") == 1


def test_answers_off_their_schema_are_re_asked_in_the_next_job_as_online(cloud):
    with FakeModelServer(ServerConfig(batch_fault="schema",
                                      batch_line_error_rate=0.5)) as server:
        results = _ask(_config(server, "gs://codeclm-test/schema"))
    jobs = list(server.batch_jobs.values())
    lines = [e for e in server.log if e["outcome"] == "batch_ok"]
    # A first job with every request, then one per round of re-asks (other seeds).
    assert len(jobs) >= 2 and int(jobs[1]["completionStats"]["successfulCount"]) < 6
    assert len(lines) == sum(r.stats.attempts for r in results.values())
    assert sum(r.stats.parse_retries for r in results.values()) == len(lines) - 6
    for result in results.values():
        assert (isinstance(result, ModelResponse) and result.data["answer"]) or \
            result.reason == "schema"
    assert not [e for e in server.log if e["outcome"] == "ok"]  # nothing online


def test_answers_are_joined_to_their_requests_even_without_the_echoed_labels(cloud):
    with FakeModelServer(ServerConfig(batch_echo_labels=False)) as server:
        results = _ask(_config(server, "gs://codeclm-test/nolabels"), n=3)
    assert not _failures(results) and len(results) == 3
    assert [r.data["answer"] for r in results.values()]


def test_a_malformed_output_line_dead_letters_only_its_element(cloud):
    with FakeModelServer(ServerConfig(batch_fault="malformed")) as server:
        results = _ask(_config(server, "gs://codeclm-test/malformed"))
    failed = _failures(results)
    assert len(failed) == 1 and len(results) == 6
    assert "1 output lines were unreadable" in next(iter(failed.values())).message


def test_answers_a_storage_server_trickles_end_at_the_request_timeout(cloud, gcs_front):
    """Issue 46: 16 bytes every 2 s, each read within any per-read timeout, would hold
    the download for minutes; the whole read is bounded instead."""
    # The job's answers, not its input (which the loopback service reads).
    gcs_front.trickled[r"/o/trickle/.*predictions\.jsonl"] = (16, 2.0)
    try:
        with FakeModelServer(ServerConfig()) as server:
            config = _config(server, "gs://codeclm-test/trickle").replace(
                request_timeout_s=1.0)
            started = time.monotonic()
            results = _ask(config)
            took = time.monotonic() - started
    finally:
        gcs_front.trickled.clear()
    assert set(_failures(results)) == set(results)
    assert {f.reason for f in results.values()} == {"transient"}
    assert "the storage server was still sending" in results["r0"].message
    assert took < 30, took  # two attempts of about a second, not the file's minutes


def test_a_job_pending_past_the_timeout_is_cancelled_and_its_elements_dead_lettered(
        cloud):
    with FakeModelServer(ServerConfig(batch_fault="stuck")) as server:
        results = _ask(_config(server, "gs://codeclm-test/stuck", timeout_s=0.5))
    assert ("POST:cancel", "1000") in server.batch_calls
    assert set(_failures(results)) == set(results)
    assert {f.reason for f in results.values()} == {"timeout"}
    assert "JOB_STATE_CANCELLED" in results["r0"].message


def test_with_online_fallback_a_timed_out_jobs_elements_are_sent_online(cloud):
    with FakeModelServer(ServerConfig(batch_fault="stuck")) as server:
        config = _config(server, "gs://codeclm-test/fallback", timeout_s=0.5,
                         fallback="online")
        results = _ask(config, n=3)
    assert not _failures(results) and len(results) == 3
    online = [e for e in server.log if e["outcome"] == "ok"]
    assert len(online) == 3 and {e["request_type"] for e in online} == {None}
    # Priced apart: the online calls carry their own model id, billed online.
    assert billing_modes(config) == {config.identity + "~batch": "batch",
                                     config.identity: "online"}


def test_a_job_created_but_never_recorded_is_found_by_its_name_not_paid_again(cloud):
    # As if a run had been killed between creating its job and writing the record.
    with FakeModelServer(ServerConfig()) as server:
        config = _config(server, "gs://codeclm-test/unrecorded")
        first = _ask(config, n=3)
        records = FileSystems.match(["gs://codeclm-test/unrecorded/**.job.json"])
        FileSystems.delete([m.path for m in records[0].metadata_list])
        again = _ask(config, n=3)
    assert [call for call, _ in server.batch_calls].count("POST") == 1
    assert ("GET", "") in server.batch_calls  # the list, filtered by display name
    assert {r: a.data for r, a in again.items()} == {r: a.data for r, a in first.items()}


def test_a_job_vertex_ai_refuses_to_create_dead_letters_each_element_with_why(cloud):
    with FakeModelServer(ServerConfig()) as server:
        config = _config(server, "gs://codeclm-test/refused").replace(
            uri="vertex:text-bison-001")
        results = _ask(config, n=2)
    assert set(_failures(results)) == {"r0", "r1"}
    assert {r.reason for r in results.values()} == {"refused"}
    assert "was not found" in results["r0"].message and not server.batch_jobs


def test_a_stage_larger_than_a_job_is_split_into_jobs_within_the_limit(cloud, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that
    from apache_beam.testing.util import equal_to

    from codeclm_beam.model.batch import BatchInference

    requests = [ModelRequest.create(f"r{i}", [ChatMessage("user", f"Colour {i}?")],
                                    GenerationSettings(max_output_tokens=100, seed=i),
                                    SCHEMA) for i in range(5)]
    with FakeModelServer(ServerConfig()) as server:
        config = _config(server, "gs://codeclm-test/shards", max_requests_per_job=2)
        with beam.Pipeline() as pipeline:
            answered = (pipeline | beam.Create([(r.request_id, r) for r in requests])
                        | BatchInference(config, "answer_target")
                        | beam.MapTuple(lambda rid, prediction: (
                            rid, isinstance(prediction.inference, ModelResponse))))
            assert_that(answered, equal_to([(f"r{i}", True) for i in range(5)]))
        sizes = sorted(int(job["completionStats"]["successfulCount"])
                       for job in server.batch_jobs.values())
    assert sum(sizes) == 5 and max(sizes) <= 2 and len(sizes) >= 3


def test_batch_mode_needs_a_cloud_storage_batch_dir():
    with pytest.raises(ConfigurationError, match="gs://"):
        ModelConfig(uri="vertex:gemini-2.5-flash", vertex_mode="batch",
                    batch=BatchConfig(batch_dir="/tmp/batch"))


def _generate_args(server, seeds, out, batch_dir, mode="batch"):
    return ["--seeds", seeds, "--output_dir", str(out), "--vertex_mode", mode,
            "--batch_dir", batch_dir, "--batch_poll_seconds", "0.5",
            "--strong_model", "vertex:gemini-2.5-flash",
            "--target_model", "vertex:gemini-2.5-flash-lite",
            "--model_base_url", server.base_url, "--num_examples", "4",
            "--num_metadata", "2", "--max_iterations", "2", "--no_report"]


def test_a_batch_run_gives_the_online_runs_pairs_at_half_the_price(tmp_path, cloud):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    with FakeModelServer(ServerConfig(accept_rate=0.5, strong_model="gemini-2.5-flash",
                                      max_seconds=300)) as server:
        online = run_generate(_generate_args(server, seeds, tmp_path / "online",
                                             "gs://codeclm-test/unused", mode="online"))
        online_requests = len(server.log)
        batch = run_generate(_generate_args(server, seeds, tmp_path / "batch",
                                            "gs://codeclm-test/e2e"))
        jobs = list(server.batch_jobs.values())
        after = server.log[online_requests:]
    # Every request of the batch run went in a job, none online, none twice.
    lines = [e for e in after if e.get("api") == "batch"]
    assert {e["outcome"] for e in lines} == {"batch_ok"}
    assert not [e for e in after if e["outcome"] == "ok"]
    assert len(lines) == online_requests == batch["model_calls"]["totals"]["requests"]
    assert max(collections.Counter(e["key"] for e in lines).values()) == 1
    assert all(job["state"] == "JOB_STATE_SUCCEEDED" for job in jobs)
    assert batch["model_calls"]["totals"]["batch_jobs"] == len(jobs)
    # Each job as google-genai created it: JSONL in, JSONL out, on Cloud Storage.
    job = jobs[0]
    assert job["inputConfig"]["instancesFormat"] == "jsonl"
    source = job["inputConfig"]["gcsSource"]["uris"][0]
    assert source.startswith("gs://codeclm-test/e2e/") and source.endswith(".jsonl")
    assert job["model"] == "publishers/google/models/" + job["model"].rsplit("/", 1)[1]
    assert FileSystems.exists(source[:-len(".jsonl")] + ".job.json")
    # The same pairs, the same tokens, half the price.
    assert sorted(map(str, read_jsonl(tmp_path / "batch", "examples"))) == \
        sorted(map(str, read_jsonl(tmp_path / "online", "examples")))
    assert batch["accounting"]["balanced"] and read_jsonl(tmp_path / "batch",
                                                           "dead_letter") == []
    for kind in ("prompt_tokens", "completion_tokens", "thoughts_tokens"):
        assert batch["model_calls"]["totals"][kind] == online["model_calls"]["totals"][kind]
    assert set(batch["billing"].values()) == {"batch"}
    assert batch["cost"]["usd"] == pytest.approx(online["cost"]["usd"] / 2, abs=2e-4)
    # `plan` from this pilot: batch wall time is its waves of jobs, one after the
    # other (encode, rubrics, decode; answers and judge; improve, answers, judge).
    projected = plan(Pilot.from_manifest(batch), num_examples=1000)
    rounds = sum(1 for r in batch["accounting"]["candidates"]["rounds"]
                 if r["candidates"])
    waves = 3 + 2 + 3 * (rounds - 1)
    assert projected["wall_hours_by_mode"]["batch"] == [0.5 * waves, 24.0 * waves]
    assert f"batch {0.5 * waves:,}-{24.0 * waves:,} h" in render(projected)


def test_the_judge_in_batch_and_the_strong_model_online_are_each_priced_at_their_mode(
        tmp_path, cloud):
    # One model for two roles (the judge defaults to the strong model), two modes.
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)
    with FakeModelServer(ServerConfig(accept_rate=0.5, strong_model="gemini-2.5-flash",
                                      max_seconds=300)) as server:
        manifest = run_generate(_generate_args(server, seeds, tmp_path / "out",
                                               "gs://codeclm-test/per-role",
                                               mode="judge=batch"))
        log = list(server.log)
    by_stage = manifest["model_calls"]["by_stage"]
    strong = "vertex:gemini-2.5-flash@" + server.base_url
    assert set(by_stage["judge"]["models"]) == {strong + "~batch"}
    assert set(by_stage["answer_strong"]["models"]) == {strong}
    # The judge's requests went in jobs, every other stage's online.
    in_jobs = [e for e in log if e.get("api") == "batch"]
    online = [e for e in log if e["outcome"] == "ok"]
    assert len(in_jobs) == by_stage["judge"]["models"][strong + "~batch"]["requests"] > 0
    assert len(online) == manifest["model_calls"]["totals"]["requests"] - len(in_jobs)
    assert manifest["billing"][strong + "~batch"] == "batch"
    assert manifest["billing"][strong] == "online"
    by_role = manifest["cost"]["by_role"]
    assert by_role["judge"]["modes"] == ["batch"]
    assert by_role["strong"]["modes"] == by_role["target"]["modes"] == ["online"]
    # `plan` prices each role in the pilot's modes unless told otherwise.
    as_pilot = plan(Pilot.from_manifest(manifest), num_examples=1_000_000)
    online_plan = plan(Pilot.from_manifest(manifest), num_examples=1_000_000,
                       vertex_mode="online")
    assert {s["mode"] for s in as_pilot["stages"] if s["role"] == "judge"} == {"batch"}
    assert {s["mode"] for s in as_pilot["stages"] if s["role"] != "judge"} == {"online"}
    judge_online = online_plan["cost_usd_by_role"]["judge"]
    assert judge_online > 1 and as_pilot["cost_usd_by_role"]["judge"] == pytest.approx(
        judge_online / 2, abs=0.01)
    assert as_pilot["cost_usd_by_role"]["strong"] == online_plan["cost_usd_by_role"]["strong"]
    rows = [line.split() for line in render(as_pilot).splitlines()
            if line.split()[:1] in (["judge"], ["answer_strong"])]
    assert {row[0]: row[2] for row in rows} == {"judge": "batch", "answer_strong": "online"}


def test_a_run_killed_while_its_job_runs_resumes_it_and_pays_for_no_request_twice(
        tmp_path, cloud):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)
    out, batch_dir = tmp_path / "out", "gs://codeclm-test/killed"
    config = ServerConfig(accept_rate=0.5, strong_model="gemini-2.5-flash",
                          batch_pending_seconds=120, max_seconds=300)
    with FakeModelServer(config) as server:
        args = _generate_args(server, seeds, out, batch_dir)
        first = subprocess.Popen(
            [sys.executable, "-c", ANONYMOUS_GCS, "generate", *args],
            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.time() + 120
            while not server.batch_jobs:
                assert time.time() < deadline and first.poll() is None
                time.sleep(0.2)
            while not FileSystems.match([batch_dir + "/**.job.json"])[0].metadata_list:
                assert time.time() < deadline
                time.sleep(0.2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        assert [job["state"] for job in server.batch_jobs.values()] == ["JOB_STATE_PENDING"]
        server.config.batch_pending_seconds = 0.2
        manifest = run_generate(args)
        creates = [call for call, _ in server.batch_calls].count("POST")
        answered = collections.Counter(e["key"] for e in server.log
                                       if e["outcome"] == "batch_ok")
        # A third run finds every answer in the cache: no job at all.
        run_generate(args)
        assert [call for call, _ in server.batch_calls].count("POST") == creates
    assert manifest["accounting"]["balanced"] and read_jsonl(out, "examples")
    # The killed run's job was resumed, not submitted again; no request paid twice.
    assert creates == len(server.batch_jobs) == manifest["model_calls"]["totals"][
        "batch_jobs"]
    assert len({job["displayName"] for job in server.batch_jobs.values()}) == creates
    assert answered and max(answered.values()) == 1
