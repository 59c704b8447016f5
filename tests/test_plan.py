"""`codeclm-beam plan`: projecting a pilot run's measurements must reproduce the pilot
itself exactly when asked for the pilot's own sizes, and scale by the budget rule."""
import dataclasses
import json

import pytest

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.pipelines.cli import main
from codeclm_beam.pipelines.commands.plan import Pilot
from codeclm_beam.pipelines.commands.plan import basic_instructions_needed
from codeclm_beam.pipelines.commands.plan import plan
from codeclm_beam.transforms.method import simulate_rounds
from codeclm_beam.transforms.method import round_slots
from tests.helpers import generate_args
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import stage_requests
from tests.helpers import write_seeds


def measured_tokens(manifest):
    return sum(m["prompt_tokens"] + m["completion_tokens"] + m["thoughts_tokens"]
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


def test_later_rounds_follow_the_share_kept_so_far(mixed_pilot):
    pilot = Pilot.from_manifest(mixed_pilot[1])
    accept = pilot.accept_by_round
    result = plan(pilot, num_examples=100_000, num_metadata=10_000)
    judged, improved = result["candidates_by_round"], result["improved_by_round"]
    assert judged[0] == 100_000  # round 1 judges what is wanted; the rest is reserve
    kept = judged[0] * accept[0]
    slots = round_slots(kept, judged[0], 100_000, 0)
    assert improved[0] == pytest.approx(min(judged[0] * (1 - accept[0]), slots), abs=1)
    # The rest of the slots is fresh, as far as the reserve goes.
    reserve = result["num_instructions"] - judged[0]
    assert judged[1] == pytest.approx(improved[0] + min(reserve, slots - improved[0]),
                                      abs=1)
    assert result["expected_pairs"] >= 99_999
    # The fewest basic instructions that get there.
    assert result["num_instructions"] == basic_instructions_needed(
        accept, 100_000, 0, pilot.keep_unresolved)


def test_plan_follows_the_early_stop_of_num_examples(tmp_path):
    # The scripted ties pilot of the end-to-end tests: 16 basic instructions, 5 wanted,
    # margin 1, so rounds judge [6, 16, 16, 16]; the plan must make the same calls.
    models = scripted_models(tmp_path, "tie")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 6)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_metadata", "8",
        "--num_instructions", "16", "--num_examples", "5", "--overgenerate_margin", "1",
        "--no_report"))
    result = plan(Pilot.from_manifest(manifest), num_examples=5, num_instructions=16,
                  num_seeds=6, num_metadata=8, overgenerate_margin=1)
    assert result["candidates_by_round"] == [6, 16, 16, 16]
    assert planned_requests(result) == stage_requests(manifest)
    assert result["expected_pairs"] == 0
    assert any("fall short" in w and "no number of basic instructions" in w
               for w in result["warnings"])


def test_rounds_by_hand():
    half = (0.5, 0.5, 0.5, 0.5)
    # More pairs wanted than basic instructions: every undecided one is improved.
    rounds = simulate_rounds(half, 16, wanted=100, margin=0, keep_unresolved=False)
    assert (rounds.judged, rounds.improved, rounds.pairs) == ([16, 8, 4, 2], [8, 4, 2], 15)
    # 10 wanted: round 1 judges 10 and keeps 5; 5 missing at a share of 1/2 makes 10
    # slots, the 5 undecided improved and 5 fresh from the reserve: 5 more kept.
    rounds = simulate_rounds(half, 16, wanted=10, margin=0, keep_unresolved=False)
    assert (rounds.judged, rounds.improved, rounds.pairs) == ([10, 10], [5], 10)
    rounds = simulate_rounds(half, 16, wanted=100, margin=0, keep_unresolved=True)
    assert rounds.pairs == 16
    # 11: round 1 judges 10 (5 kept), round 2 improves 5 and draws the 1 left (3
    # kept), rounds 3 and 4 improve what is still undecided (1.5, then 0.5).
    assert basic_instructions_needed(half, 10, margin=0, keep_unresolved=False) == 11
    assert simulate_rounds(half, 11, 10, 0, False).judged == [10, 6, 3, 1]
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


def test_a_pilot_whose_judge_separated_nothing_is_said_to_have_kept_by_fallback(
        mixed_pilot):
    _, manifest = mixed_pilot
    pilot = dataclasses.replace(Pilot.from_manifest(manifest), keep_unresolved=True,
                                accept_by_round=(0.0, 0.0, 0.0, 0.0))
    warnings = plan(pilot, num_examples=1000)["warnings"]
    assert any("separated none" in w and "--keep_unresolved" in w for w in warnings)
    # A pilot that kept by the gap rule gets no such warning.
    assert not any("separated none" in w
                   for w in plan(Pilot.from_manifest(manifest), 1000)["warnings"])
