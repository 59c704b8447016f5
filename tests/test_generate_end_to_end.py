"""`generate` end to end with a scripted backend whose judge scores the test chooses,
checked against the method's exact call budget, plus cache re-runs, the real embedded
model, and a Dataflow dry run."""
import collections
import json
import os
import pickle

import fastavro
import jsonschema
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam.records import Example
from codeclm_beam.records import avro_schema
from tests.helpers import calls_by_kind
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import stage_requests
from tests.helpers import write_seeds

N_SEEDS = 6
NUM_METADATA = 8  # 6 originals + 2 mixed
NUM_INSTRUCTIONS = 16  # ceil(16 / 8) = 2 per entry -> B = 16


def budget(n, m, b_per_iteration_counts):
    """The method's call budget: n encode + M rubrics + M decode, and per candidate per
    iteration 1 strong + 1 target + 2 judge, plus 1 improve before iterations 2.."""
    calls = {"encode": n, "rubrics": m, "decode": m, "answer_strong": 0,
             "answer_target": 0, "judge": 0, "improve": 0}
    for iteration, count in enumerate(b_per_iteration_counts, start=1):
        calls["answer_strong"] += count
        calls["answer_target"] += count
        calls["judge"] += 2 * count
        if iteration > 1:
            calls["improve"] += count
    return {k: v for k, v in calls.items() if v}


def scenario(tmp_path, judge, *extra, output="out"):
    models = scripted_models(tmp_path, judge)
    seeds = write_seeds(tmp_path / "seeds.jsonl", N_SEEDS)
    argv = generate_args(tmp_path, models, seeds, tmp_path / output,
                         "--num_metadata", str(NUM_METADATA),
                         "--num_instructions", str(NUM_INSTRUCTIONS),
                         "--num_examples", "100", *extra)
    return argv


def check_strong_wins(tmp_path, manifest, output="out"):
    B = NUM_INSTRUCTIONS
    expected = budget(N_SEEDS, NUM_METADATA, [B])
    assert calls_by_kind(tmp_path) == expected
    assert stage_requests(manifest) == expected
    assert manifest["model_calls"]["totals"]["requests"] == \
        N_SEEDS + 2 * NUM_METADATA + 4 * B
    examples = read_jsonl(tmp_path / output, "examples")
    assert len(examples) == B
    assert {e["response_source"] for e in examples} == {"strong"}
    assert {e["iteration"] for e in examples} == {1}
    assert all(e["gap"] == 7.0 and e["strong_score"] == 9.0 for e in examples)
    assert read_jsonl(tmp_path / output, "rejected") == []
    assert manifest["accounting"]["balanced"], manifest["accounting"]["checks"]
    return examples


def assert_avro_rows_equal(output_dir, name, jsonl_rows):
    rows = []
    for path in sorted((output_dir / name).glob("*.avro")):
        with open(path, "rb") as f:
            rows.extend(fastavro.reader(f))
    key = lambda r: r.get("example_id") or r["candidate_id"]  # noqa: E731
    assert sorted(rows, key=key) == sorted(jsonl_rows, key=key)


def test_strong_wins_everything_is_kept_in_round_one_on_budget(tmp_path, caplog):
    caplog.set_level("INFO", logger="apache_beam.runners.direct")
    manifest = run_generate(scenario(tmp_path, "strong_wins"))
    check_strong_wins(tmp_path, manifest)
    # No runner given: it runs where the DirectRunner would end up, without first
    # converting the graph for Prism and fetching Prism's binary from GitHub.
    assert "PrismRunner" not in caplog.text
    acc = manifest["accounting"]
    assert acc["seeds"]["seeds"] == N_SEEDS and acc["metadata_pool"]["entries"] == 8
    assert acc["candidates"]["rounds"][0] == {
        "round": 1, "candidates": 16, "fresh": 0, "kept": 16, "undecided": 0,
        "not_needed": 0, "duplicate": 0, "contaminated": 0}
    pool = read_jsonl(tmp_path / "out", "metadata_pool")
    assert collections.Counter(m["origin"] for m in pool) == {"seed": 6, "mix": 2}
    rubrics = read_jsonl(tmp_path / "out", "rubrics")
    assert len(rubrics) == 8 and all(len(r["actions"]) == 4 for r in rubrics)


def test_a_pipelines_options_make_each_view_once_and_share_its_values():
    # Beam re-parses every flag for each view and asks for thousands while it builds
    # a graph; new_pipeline's options make each view once, and must still behave as
    # views: one set of values, the caller's options untouched, picklable.
    from apache_beam.options.pipeline_options import TypeOptions
    from codeclm_beam.pipelines.run.args import RunOptions
    from codeclm_beam.pipelines.run.manifest import new_pipeline
    users = PipelineOptions(["--output_dir", "first", "--quiet"])
    options = new_pipeline(users).options
    assert options.view_as(TypeOptions) is options.view_as(TypeOptions)
    options.view_as(RunOptions).output_dir = "second"
    assert options.view_as(RunOptions).output_dir == "second"
    assert options.get_all_options()["output_dir"] == "second"
    assert users.view_as(RunOptions).output_dir == "first"
    restored = pickle.loads(pickle.dumps(options))
    assert "_views" not in restored.__dict__
    assert restored.view_as(RunOptions).output_dir == "second"
    assert restored.view_as(RunOptions).quiet is True


def test_strong_wins_on_the_multiprocessing_direct_runner(tmp_path, capfd):
    manifest = run_generate(scenario(
        tmp_path, "strong_wins", "--direct_num_workers", "2",
        "--direct_running_mode", "multi_processing"))
    check_strong_wins(tmp_path, manifest)
    # The live progress sees the calls made in the worker processes: its last line
    # counts what the manifest counts (it said "calls 0" before they published).
    final = [line for line in capfd.readouterr().err.splitlines()
             if line.startswith("done [")][-1]
    assert f"calls {manifest['model_calls']['totals']['elements']} " in final + " ", final
    assert f"kept {manifest['accounting']['candidates']['kept']}/" in final, final


def test_ties_run_every_round_and_end_rejected_at_19_calls_each(tmp_path):
    manifest = run_generate(scenario(tmp_path, "tie"))
    B = NUM_INSTRUCTIONS
    expected = budget(N_SEEDS, NUM_METADATA, [B, B, B, B])
    assert calls_by_kind(tmp_path) == expected
    assert stage_requests(manifest) == expected
    per_candidate = (sum(expected.values()) - N_SEEDS - 2 * NUM_METADATA) / B
    assert per_candidate == 19
    assert read_jsonl(tmp_path / "out", "examples") == []
    rejected = read_jsonl(tmp_path / "out", "rejected")
    assert len(rejected) == B
    assert all(r["reason"] == "within_threshold" and r["iteration"] == 4
               and r["gap"] == 0.0 and len(r["actions_applied"]) == 3 for r in rejected)
    # Actions not yet applied are preferred: three rewrites, three different actions.
    assert all(len(set(r["actions_applied"])) == 3 for r in rejected)
    # The chain: every earlier version, and the action that made the next one.
    for r in rejected:
        versions = r["history"] + [r["instruction"]]
        assert len(r["history"]) == 3
        assert all(after == f"{before} Also: {action}." for before, action, after in
                   zip(versions, r["actions_applied"], versions[1:]))
    assert_avro_rows_equal(tmp_path / "out", "rejected", rejected)
    assert manifest["accounting"]["balanced"]


def test_target_wins_keeps_the_targets_answers(tmp_path):
    manifest = run_generate(scenario(tmp_path, "target_wins"))
    examples = read_jsonl(tmp_path / "out", "examples")
    assert len(examples) == NUM_INSTRUCTIONS
    assert all(e["response_source"] == "target" and e["gap"] == -7.0
               and e["response"].startswith("TARGET ANSWER:") for e in examples)
    assert manifest["accounting"]["balanced"]


def test_a_round_judges_what_is_still_needed_over_the_share_kept(tmp_path):
    # Ties everywhere and 5 pairs wanted (+1 margin) of 16 basic instructions: round 1
    # judges 6, the rest is the reserve. Nothing is kept, so each later round judges
    # 5 / MIN_YIELD + 1 = 21 at most: the 6 undecided improved, then 10 fresh ones.
    argv = scenario(tmp_path, "tie", "--num_examples", "5", "--overgenerate_margin", "1")
    manifest = run_generate(argv)
    rounds = manifest["accounting"]["candidates"]["rounds"]
    assert [r["candidates"] for r in rounds] == [6, 16, 16, 16]
    assert [r["fresh"] for r in rounds] == [0, 10, 0, 0]
    assert [r["not_needed"] for r in rounds] == [0, 0, 0, 0]
    assert calls_by_kind(tmp_path)["improve"] == 6 + 16 + 16
    assert calls_by_kind(tmp_path)["judge"] == 2 * (6 + 16 + 16 + 16)
    assert manifest["accounting"]["balanced"]


def test_ask_for_12_get_12(tmp_path):
    # The judge separates about half the candidates in each round; only the number
    # of pairs is given.
    models = scripted_models(tmp_path, "half")
    seeds = write_seeds(tmp_path / "seeds.jsonl", N_SEEDS)
    manifest = run_generate(generate_args(tmp_path, models, seeds, tmp_path / "out",
                                          "--num_examples", "12", "--no_report"))
    assert len(read_jsonl(tmp_path / "out", "examples")) == 12
    assert manifest["delivery"] == {"asked": 12, "delivered": 12}
    acc = manifest["accounting"]
    assert acc["balanced"], acc["checks"]
    rounds = acc["candidates"]["rounds"]
    assert rounds[0]["candidates"] == 12 and sum(r["fresh"] for r in rounds) > 0
    # No round runs once 12 are kept, and every call is the method's.
    kept, judged = 0, 0
    for r in rounds:
        assert r["candidates"] == 0 or kept < 12
        kept += r["kept"]
        judged += r["candidates"]
    improved_examples = [e for e in read_jsonl(tmp_path / "out", "examples")
                         if e["iteration"] > 1]
    assert improved_examples and all(
        len(e["history"]) == len(e["actions_applied"]) == e["iteration"] - 1
        for e in improved_examples)
    assert_avro_rows_equal(tmp_path / "out", "examples",
                           read_jsonl(tmp_path / "out", "examples"))
    pool = acc["metadata_pool"]["entries"]
    improved = sum(r["candidates"] - r["fresh"] for r in rounds[1:])
    assert stage_requests(manifest) == {
        "encode": N_SEEDS, "rubrics": pool, "decode": pool, "answer_strong": judged,
        "answer_target": judged, "judge": 2 * judged, "improve": improved}


def test_a_short_delivery_says_why_and_how_to_close_the_gap(tmp_path):
    models = scripted_models(tmp_path, "tie")
    seeds = write_seeds(tmp_path / "seeds.jsonl", N_SEEDS)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_examples", "3",
        "--num_metadata", "6", "--no_report"))
    delivery = manifest["delivery"]
    assert (delivery["asked"], delivery["delivered"], delivery["gap"]) == (3, 0, 3)
    assert "within the threshold after the last round" in delivery["reason"]
    assert delivery["to_close_the_gap"].startswith("codeclm-beam generate --judge_model")
    assert "--num_examples 3" in delivery["to_close_the_gap"]
    assert "--num_instructions" in delivery["to_close_the_gap"]


def test_rerun_with_the_same_cache_makes_no_call_and_writes_identical_examples(tmp_path):
    argv = scenario(tmp_path, "strong_wins", "--cache_dir", str(tmp_path / "cache"))
    run_generate(argv)
    first_calls = sum(calls_by_kind(tmp_path).values())
    first = read_jsonl(tmp_path / "out", "examples")
    manifest = run_generate(scenario(tmp_path, "strong_wins", "--cache_dir",
                                     str(tmp_path / "cache"), output="again"))
    assert sum(calls_by_kind(tmp_path).values()) == first_calls  # zero new calls
    assert manifest["model_calls"]["totals"].get("requests", 0) == 0
    assert manifest["model_calls"]["totals"]["cache_hits"] == first_calls
    again = read_jsonl(tmp_path / "again", "examples")
    key = lambda e: e["example_id"]
    assert sorted(first, key=key) == sorted(again, key=key)


def test_outputs_avro_and_exports(tmp_path):
    run_generate(scenario(tmp_path, "strong_wins", "--export_format", "vertex",
                          "--export_format", "openai", "--export_format", "alpaca"))
    out = tmp_path / "out"
    avro_files = list((out / "examples").glob("*.avro"))
    records = []
    for path in avro_files:
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            assert reader.writer_schema["name"] == "codeclm_beam.Example"
            records.extend(reader)
    assert len(records) == NUM_INSTRUCTIONS
    fastavro.validation.validate_many(records, fastavro.parse_schema(avro_schema(Example)))
    assert {r["example_id"] for r in records} == \
        {e["example_id"] for e in read_jsonl(out, "examples")}
    vertex = [json.loads(l) for p in (out / "export").glob("vertex-*.jsonl")
              for l in open(p)]
    assert len(vertex) == NUM_INSTRUCTIONS
    assert [c["role"] for c in vertex[0]["contents"]] == ["user", "model"]
    openai_rows = [json.loads(l) for p in (out / "export").glob("openai-*.jsonl")
                   for l in open(p)]
    assert [m["role"] for m in openai_rows[0]["messages"]] == ["user", "assistant"]
    alpaca = json.load(open(out / "export" / "alpaca.json"))
    assert len(alpaca) == NUM_INSTRUCTIONS and set(alpaca[0]) == {
        "instruction", "input", "output"}
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["models"]["strong"].startswith("custom:tests.scripted_backend")
    assert manifest["options"]["num_examples"] == 100


def test_dead_letters_are_accounted_for(tmp_path):
    # The strong model refuses (400) every instruction that mentions "poem".
    models = scripted_models(tmp_path, "strong_wins",
                             per_role={"strong": {"fail_when": "poem"}})
    seeds = write_seeds(tmp_path / "seeds.jsonl", N_SEEDS)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_metadata", "8",
        "--num_instructions", "16", "--num_examples", "100"))
    dead = read_jsonl(tmp_path / "out", "dead_letter")
    assert dead and all(d["error_class"] == "PermanentModelError" for d in dead)
    assert all("poem" in (d["payload"] or "") for d in dead)
    assert manifest["accounting"]["balanced"], manifest["accounting"]["checks"]
    assert manifest["accounting"]["dead_letters_by_stage"]["encode"] == 1


@pytest.mark.timeout(900)
@pytest.mark.embedded
def test_real_embedded_model_on_three_seeds(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    with open(seeds, "w") as f:
        for text in ("Write a haiku about the sea.",
                     "Explain what a Python list comprehension is.",
                     "Give three tips for a job interview."):
            f.write(json.dumps({"instruction": text}) + "\n")
    manifest = run_generate([
        "--seeds", str(seeds), "--output_dir", str(tmp_path / "out"),
        "--num_metadata", "3", "--num_instructions", "3", "--num_examples", "2",
        "--max_iterations", "2", "--max_output_tokens", "96", "--max_parse_retries", "0",
        "--codec_max_output_tokens", "384"])
    assert manifest["models"]["strong"] == "llamacpp:smollm2-135m"
    assert manifest["accounting"]["balanced"], manifest["accounting"]["checks"]
    pool = read_jsonl(tmp_path / "out", "metadata_pool")
    assert len(pool) == 3 and all(m["use_case"] and 1 <= len(m["skills"]) <= 3
                                  for m in pool)
    # SmolLM2 rambles past 96 tokens now and then: such answers are dead letters
    # with the reason, never kept as if complete.
    for dead in read_jsonl(tmp_path / "out", "dead_letter"):
        assert dead["reason"] in ("truncated", "schema"), dead
    for name in ("examples", "rejected"):
        for row in read_jsonl(tmp_path / "out", name):
            assert row["instruction"].strip()
            if name == "examples":
                jsonschema.validate(row, {"type": "object", "required": [
                    "instruction", "response", "strong_score", "target_score", "gap"]})
                assert 1 <= row["strong_score"] <= 10
    # One basic instruction per entry, but for an entry whose decode answer was cut.
    acc = manifest["accounting"]
    assert acc["candidates"]["basic_instructions"] + \
        acc["metadata_pool"]["decode_dead_letter"] == 3


def test_readme_example_of_stages_in_an_existing_pipeline(tmp_path):
    import importlib.util
    models = scripted_models(tmp_path, "strong_wins")
    spec = importlib.util.spec_from_file_location(
        "existing_pipeline", os.path.join(os.path.dirname(__file__), "..", "examples",
                                          "existing_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--strong_uri", models["strong"], "--target_uri", models["target"],
                 "--output_dir", str(tmp_path / "mine")])
    assert len(read_jsonl(tmp_path / "mine", "metadata")) == 2
    pairs = read_jsonl(tmp_path / "mine", "pairs")
    assert len(pairs) == 2 and all(p["response_source"] == "strong" for p in pairs)
    assert read_jsonl(tmp_path / "mine", "dead_letter") == []


def test_metrics_count_retries_failures_tokens_per_stage(tmp_path):
    # The judge answers 503 to its first three calls (retried), the strong model
    # refuses anything about "poem" (400, a failure).
    models = scripted_models(tmp_path, "strong_wins", per_role={
        "judge": {"fail_first": {"judge": 3}}, "strong": {"fail_when": "poem"}})
    seeds = write_seeds(tmp_path / "seeds.jsonl", N_SEEDS)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_metadata", "8",
        "--num_instructions", "16", "--num_examples", "100", "--max_retries", "5"))
    by_stage = manifest["model_calls"]["by_stage"]
    judge = next(iter(by_stage["judge"]["models"].values()))
    encode = next(iter(by_stage["encode"]["models"].values()))
    assert judge["retries"] == 3 and judge["failures"] == 0
    assert judge["requests"] == judge["elements"] + 3
    assert encode["failures"] == 1 and encode["elements"] == N_SEEDS
    assert all(m["prompt_tokens"] > 0 and m["completion_tokens"] > 0
               for entry in by_stage.values() for m in entry["models"].values())
    assert manifest["accounting"]["balanced"]


def test_a_rerun_commits_its_own_folder_and_removes_only_what_the_old_record_names(
        tmp_path):
    argv = scenario(tmp_path, "strong_wins")
    out = tmp_path / "out"
    first = run_generate(argv)
    old = out / first["run_folder"]
    assert (out / "current").resolve() == old.resolve()
    # A file no record names, in the old run's folder: never removed by a later run.
    (old / "examples" / "examples-00007-of-00009.jsonl").write_text('{"x": 1}\n')
    second = run_generate(argv)
    new = out / second["run_folder"]
    assert new != old and (out / "current").resolve() == new.resolve()
    assert len(read_jsonl(out, "examples")) == NUM_INSTRUCTIONS  # through the links
    assert not any((old / name).exists() for name in first["files"])
    assert (old / "examples" / "examples-00007-of-00009.jsonl").exists()
    on_disk = {str(p.relative_to(new)) for p in new.rglob("*") if p.is_file()}
    assert on_disk == set(second["files"]) | {".run"}, "every file is listed, and only those"


def test_more_distinct_seed_metadata_than_num_metadata_keeps_them_all(tmp_path):
    models = scripted_models(tmp_path, "strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", N_SEEDS)  # 6 distinct use cases
    manifest = run_generate(generate_args(tmp_path, models, seeds, tmp_path / "out",
                                          "--num_metadata", "4", "--num_examples", "2",
                                          "--no_report"))
    pool = manifest["accounting"]["metadata_pool"]
    assert (pool["entries"], pool["asked"]) == (N_SEEDS, 4)
    assert "larger than --num_metadata" in pool["note"]
    assert {m["origin"] for m in read_jsonl(tmp_path / "out", "metadata_pool")} == {"seed"}
    assert stage_requests(manifest)["rubrics"] == N_SEEDS
