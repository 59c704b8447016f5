"""`codeclm-beam evaluate`: CRR with a scripted judge whose verdict on every item is
known, every benchmark layout from fixture files, and the summary and table."""
import json
import os

import pytest

from codeclm_beam.pipelines.evaluate import bootstrap_difference
from codeclm_beam.pipelines.evaluate import crr
from codeclm_beam.pipelines.evaluate import run
from codeclm_beam.transforms.evaluate import detect_file_layout
from codeclm_beam.transforms.judge import Contest
from codeclm_beam.transforms.judge import Verdict
from tests.helpers import read_jsonl
from tests.scripted_backend import write_scenario

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks")
EXPECTED = {  # benchmark: (wins, ties, losses), from the [WIN]/[LOSS]/... markers
    "evol_instruct": (1, 3, 1), "vicuna": (2, 1, 1), "vicuna_old": (1, 1, 0),
    "self_instruct": (1, 0, 1), "koala": (1, 1, 0)}


@pytest.mark.parametrize("candidate_first,reference_first,expected", [
    ((9, 3), (9, 3), "win"),    # wins in both orders
    ((3, 9), (3, 9), "loss"),   # loses in both orders
    ((9, 3), (3, 9), "tie"),    # wins only when it is Assistant 1
    ((3, 9), (9, 3), "tie"),    # wins only when it is Assistant 2
    ((5, 5), (9, 3), "tie"),    # a draw in one order is never a win
])
def test_position_swap_rule(candidate_first, reference_first, expected):
    contest = Contest("item", "instruction", "candidate", "reference",
                      ("candidate", "reference"))
    verdict = Verdict(contest, first_scores=(candidate_first[0], reference_first[0]),
                      second_scores=(candidate_first[1], reference_first[1]))
    assert verdict.outcome == expected


def test_crr_and_bootstrap_arithmetic():
    assert crr({"win": 1, "tie": 3, "loss": 1}) == 80.0
    assert bootstrap_difference(["loss"] * 10, ["win"] * 10, 500, 0) == {
        "difference": 100.0, "ci95_low": 100.0, "ci95_high": 100.0, "items": 10}
    mixed = bootstrap_difference(["loss", "tie"] * 20, ["tie", "tie"] * 20, 500, 0)
    assert mixed["difference"] == 50.0
    assert mixed["ci95_low"] < 50.0 < mixed["ci95_high"]


@pytest.mark.parametrize("name,layout", [
    ("evol_instruct", "evol-instruct"), ("vicuna", "vicuna"), ("vicuna_old", "vicuna-old"),
    ("self_instruct", "self-instruct"), ("koala", "koala")])
def test_layouts_are_detected(name, layout):
    assert detect_file_layout(os.path.join(FIXTURES, f"{name}.jsonl")).name == layout


def test_an_unreadable_layout_fails_early_naming_file_and_fields(tmp_path):
    with pytest.raises(ValueError) as error:
        run(["--benchmark", os.path.join(FIXTURES, "unknown_layout.jsonl"),
             "--output_dir", str(tmp_path)])
    assert "unknown_layout.jsonl" in str(error.value)
    assert "['query_text', 'ref']" in str(error.value)


def scripted(tmp_path, role, name=None):
    return write_scenario(tmp_path / f"{name or role}.json", role=role,
                          judge="by_instruction", log_dir=str(tmp_path / "calls"))


def test_crr_per_benchmark_and_candidate(tmp_path):
    out = tmp_path / "out"
    candidate = scripted(tmp_path, "target")
    twin = scripted(tmp_path, "target", "twin")
    argv = ["--output_dir", str(out), "--strong_model", scripted(tmp_path, "strong"),
            "--candidate_model", candidate, "--candidate_model", twin,
            "--bootstrap_samples", "200"]
    for name in EXPECTED:
        argv += ["--benchmark", os.path.join(FIXTURES, f"{name}.jsonl")]
    summary = run(argv)
    assert summary["layouts"][os.path.join(FIXTURES, "self_instruct.jsonl")] == \
        "self-instruct"
    for row in summary["candidates"]:
        for bench, (w, t, l) in EXPECTED.items():
            cell = row["benchmarks"][bench]
            assert (cell["win"], cell["tie"], cell["loss"]) == (w, t, l), (bench, cell)
            assert cell["crr"] == round(100 * (w + t) / (w + t + l), 2)
        assert row["overall"]["total"] == 15
    assert [d for d in summary["differences"] if d["difference"] != 0] == []
    assert len(summary["differences"]) == len(EXPECTED)

    judgements = read_jsonl(out, "judgements")
    assert len(judgements) == 2 * 15
    si = next(j for j in judgements if j["benchmark"] == "self_instruct"
              and j["item_id"] == "user_oriented_task_0")
    assert si["instruction"] == "[WIN] Fix the grammar.\n\nInput: She no went to the market."
    assert si["candidate_first_scores"] == [9.0, 3.0]
    assert si["reference_first_scores"] == [9.0, 3.0]
    assert si["explanations"] == ["Assistant 1 scored 9, Assistant 2 3.",
                                  "Assistant 1 scored 3, Assistant 2 9."]
    table = (out / "crr.md").read_text().splitlines()
    header = table.index("| candidate | evol_instruct | koala | self_instruct "
                         "| vicuna | vicuna_old | overall |")
    assert table[header + 2] == (f"| {candidate} | 80.00 (1/3/1/0) | 100.00 (1/1/0/0) | "
                                 "50.00 (1/0/1/0) | 75.00 (2/1/1/0) | 100.00 (1/1/0/0) | "
                                 "80.00 (6/6/3/0) |")
    # No --judge_model: the reference judges its own answers, and the table says so.
    assert table[0].endswith("(self-judged: the judge is also the reference)")
    assert "- koala: whole file as given (the paper's tables cover whole benchmarks)" \
        in table
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"]["candidates"] == [candidate, twin]


def test_a_repeated_benchmark_question_is_judged_once_and_counted(tmp_path, capsys):
    from codeclm_beam.pipelines.cli import main
    from tests.scripted_backend import read_calls
    bench = tmp_path / "koala.jsonl"
    rows = [{"id": "a", "prompt": "[WIN] Name a prime."},
            {"id": "b", "prompt": "[WIN]  name a PRIME."},  # the same question
            {"id": "c", "prompt": "[LOSS] Compute 2 + 2."}]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = str(tmp_path / "calls")
    assert main(["evaluate", "--benchmark", str(bench), "--output_dir",
                 str(tmp_path / "out"), "--bootstrap_samples", "10",
                 "--strong_model", write_scenario(tmp_path / "s.json", role="strong",
                                                  judge="by_instruction", log_dir=calls),
                 "--candidate_model", write_scenario(tmp_path / "t.json", role="target",
                                                     judge="by_instruction",
                                                     log_dir=calls)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["duplicates_dropped"] == 1 and summary["judged"] == 2
    assert sum(1 for c in read_calls(calls) if c["kind"] == "judge") == 4  # 2 items x 2
    assert "1 benchmark rows repeat a question" in capsys.readouterr().err
