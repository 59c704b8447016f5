"""`codeclm-beam plan`: projecting a pilot run's measurements must reproduce the pilot
itself exactly when asked for the pilot's own sizes, and scale by the budget rule."""
import json

import pytest

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.pipelines.cli import main
from codeclm_beam.pipelines.plan import Pilot
from codeclm_beam.pipelines.plan import basic_instructions_needed
from codeclm_beam.pipelines.plan import plan
from codeclm_beam.pipelines.plan import simulate_rounds
from tests.helpers import generate_args
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import stage_requests
from tests.helpers import write_seeds


def measured_tokens(manifest):
    return sum(m["prompt_tokens"] + m["completion_tokens"]
               for entry in manifest["model_calls"]["by_stage"].values()
               for m in entry["models"].values())


def planned_requests(result):
    return {s["stage"]: s["requests"] for s in result["stages"]}


@pytest.fixture(scope="module")
def mixed_pilot(tmp_path_factory):
    """A pilot whose judge keeps about half the candidates in each round."""
    tmp_path = tmp_path_factory.mktemp("pilot")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 5)
    with FakeModelServer(ServerConfig(accept_rate=0.5)) as server:
        manifest = run_generate([
            "--seeds", seeds, "--output_dir", str(tmp_path / "out"),
            "--strong_model", f"openai:strong@{server.base_url}/v1",
            "--target_model", f"openai:target@{server.base_url}/v1",
            "--num_metadata", "6", "--num_instructions", "30", "--num_examples", "100",
            "--no_cache", "--no_report"])
    return tmp_path / "out", manifest


def test_plan_at_the_pilots_own_size_reproduces_its_calls_and_tokens(mixed_pilot):
    _, manifest = mixed_pilot
    rounds = [r["candidates"] for r in manifest["accounting"]["candidates"]["rounds"]]
    assert len([n for n in rounds if n]) >= 2, "the pilot should need several rounds"
    result = plan(Pilot.from_manifest(manifest), num_examples=100, num_instructions=30,
                  num_seeds=5, num_metadata=6)
    assert result["candidates_by_round"] == [n for n in rounds if n]
    assert planned_requests(result) == stage_requests(manifest)
    assert result["total_tokens"] == pytest.approx(measured_tokens(manifest), abs=8)
    assert result["expected_pairs"] == \
        manifest["accounting"]["candidates"]["examples_written"]


def test_plan_scales_to_a_large_run_within_the_budget_bounds(mixed_pilot):
    _, manifest = mixed_pilot
    pilot = Pilot.from_manifest(manifest)
    first_round = pilot.accept_by_round[0]
    assert 0 < first_round < 1
    prices = {"openai:": {"input": 1.0, "output": 4.0}}
    # A pool big enough that decode writes a few instructions per call.
    result = plan(pilot, num_examples=1_000_000, num_metadata=1_000_000, num_seeds=1_000,
                  prices=prices, requests_per_minute=10_000)
    # No margin: later rounds only refill what is missing, so round 1 carries the load.
    assert 1_000_000 < result["num_instructions"] <= 1_000_000 / first_round + 1
    assert result["expected_pairs"] >= 999_999
    fewer = plan(pilot, num_examples=1_000_000, num_instructions=
                 result["num_instructions"] - 1_000)
    assert fewer["expected_pairs"] < 999_999, "the smallest sufficient count was chosen"
    assert any("fall short" in w for w in fewer["warnings"])
    bounds = result["calls_bounds"]
    assert bounds["all_kept_in_round_1"] <= result["total_requests"] \
        <= bounds["all_rounds_for_every_candidate"]
    cost = sum((s["prompt_tokens"] * 1.0 + s["completion_tokens"] * 4.0) / 1e6
               for s in result["stages"])
    assert result["cost_usd"] == pytest.approx(cost, rel=1e-3)
    # Strong (answers, judge, improve, codec) and target are separate models, each with
    # the quota: the busier one sets the hours.
    strong = sum(s["requests"] for s in result["stages"]
                 if s["model"].startswith("openai:strong"))
    assert result["quota_bound_hours"] == pytest.approx(strong / 10_000 / 60, abs=0.01)
    assert result["warnings"] == []


def test_by_default_every_undecided_candidate_is_improved(mixed_pilot):
    pilot = Pilot.from_manifest(mixed_pilot[1])
    q1 = 1 - pilot.accept_by_round[0]
    method_mix = plan(pilot, num_examples=100_000, num_metadata=10_000)
    rounds = method_mix["candidates_by_round"]
    assert rounds[1] == pytest.approx(rounds[0] * q1, abs=1)
    assert method_mix["expected_pairs"] >= 99_999
    # Margin 0: later rounds only refill what is missing, so more basic instructions
    # are needed and almost none of the pairs come from improved instructions.
    no_margin = plan(pilot, num_examples=100_000, num_metadata=10_000,
                     overgenerate_margin=0)
    assert no_margin["num_instructions"] > method_mix["num_instructions"]
    assert sum(no_margin["candidates_by_round"][1:]) < 0.01 * sum(rounds[1:])
    assert no_margin["expected_pairs"] >= 99_999


def test_plan_follows_the_early_stop_of_num_examples(tmp_path):
    # The scripted ties pilot of the end-to-end tests: 16 basic instructions, 5 wanted,
    # margin 1, so rounds judge [16, 6, 6, 6]; the plan must make the same calls.
    models = scripted_models(tmp_path, "tie")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 6)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_metadata", "8",
        "--num_instructions", "16", "--num_examples", "5", "--overgenerate_margin", "1",
        "--no_report"))
    result = plan(Pilot.from_manifest(manifest), num_examples=5, num_instructions=16,
                  num_seeds=6, num_metadata=8, overgenerate_margin=1)
    assert result["candidates_by_round"] == [16, 6, 6, 6]
    assert planned_requests(result) == stage_requests(manifest)
    assert result["expected_pairs"] == 0
    assert any("fall short" in w and "no number of basic instructions" in w
               for w in result["warnings"])


def test_rounds_by_hand():
    half = (0.5, 0.5, 0.5, 0.5)
    assert simulate_rounds(half, 16, wanted=100, margin=0, keep_unresolved=False) == \
        ([16, 8, 4, 2], 15)
    # 8 kept in round 1; only the 2 still missing are improved, then 1, then 0.5.
    assert simulate_rounds(half, 16, wanted=10, margin=0, keep_unresolved=False) == \
        ([16, 2, 1, 0.5], 9.75)
    assert simulate_rounds(half, 16, wanted=100, margin=0, keep_unresolved=True) == \
        ([16, 8, 4, 2], 16)
    # 12 -> 6 kept, then 4, 2, 1 refilled: 9.5 pairs expected (11 gives 9.44).
    assert basic_instructions_needed(half, 10, margin=0, keep_unresolved=False) == 12
    assert basic_instructions_needed(half, 10, margin=0, keep_unresolved=True) == 10
    assert basic_instructions_needed((0.0,) * 4, 10, margin=5, keep_unresolved=False) \
        is None


def test_plan_command_prints_json_and_warns_about_huge_decode_calls(mixed_pilot, capsys):
    run_dir, _ = mixed_pilot
    assert main(["plan", str(run_dir), "--num_examples", "100000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 100_000
    assert any("raise --num_metadata" in w for w in result["warnings"])
    assert main(["plan", str(run_dir), "--num_examples", "1000"]) == 0
    assert "--num_instructions" in capsys.readouterr().out
