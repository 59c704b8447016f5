"""`codeclm-beam split`: a seeded, stratified 20/80 split whose seed part `evaluate`
refuses unless told to."""
import collections
import json

import pytest

from codeclm_beam.pipelines.cli import main
from codeclm_beam.pipelines.evaluate import run as run_evaluate
from codeclm_beam.pipelines.commands.split import split_file
from tests.scripted_backend import write_scenario


def write_vicuna(path, per_category):
    with open(path, "w") as f:
        qid = 0
        for category, count in per_category.items():
            for _ in range(count):
                qid += 1
                f.write(json.dumps({"question_id": qid, "category": category,
                                    "turns": [f"[WIN] Question {qid} about {category}?"]})
                        + "\n")
    return str(path)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_split_is_stratified_seeded_and_complete(tmp_path):
    path = write_vicuna(tmp_path / "vicuna.jsonl", {"math": 10, "coding": 20, "roleplay": 5})
    result = split_file(str(path), str(tmp_path / "split"), 0.2, seed=3)
    assert result["stratified_by"] == "category"
    seeds, held = rows(result["files"]["seeds"]), rows(result["files"]["eval"])
    assert collections.Counter(r["category"] for r in seeds) == {
        "math": 2, "coding": 4, "roleplay": 1}
    assert len(seeds) + len(held) == 35
    assert not {r["question_id"] for r in seeds} & {r["question_id"] for r in held}
    assert {r["codeclm_split"] for r in seeds} == {"seeds"}
    again = split_file(str(path), str(tmp_path / "again"), 0.2, seed=3)
    assert rows(again["files"]["seeds"]) == seeds
    other = split_file(str(path), str(tmp_path / "other"), 0.2, seed=4)
    assert rows(other["files"]["seeds"]) != seeds


def test_evaluate_refuses_the_seed_part_unless_told(tmp_path, capsys):
    path = write_vicuna(tmp_path / "vicuna.jsonl", {"generic": 10})
    assert main(["split", str(path), "--output_dir", str(tmp_path / "split")]) == 0
    assert '"seeds": 2' in capsys.readouterr().out
    seeds_part = str(tmp_path / "split" / "vicuna.seeds.jsonl")
    log = str(tmp_path / "calls")
    uris = {r: write_scenario(tmp_path / f"{r}.json", role=r, judge="by_instruction",
                              log_dir=log) for r in ("strong", "target")}
    argv = ["--output_dir", str(tmp_path / "eval"), "--strong_model", uris["strong"],
            "--candidate_model", uris["target"], "--no_report"]
    with pytest.raises(ValueError, match="seed part"):
        run_evaluate(argv + ["--benchmark", seeds_part])
    summary = run_evaluate(argv + ["--benchmark", seeds_part, "--allow_seed_items"])
    assert summary["candidates"][0]["overall"]["total"] == 2
    held = run_evaluate(argv + ["--benchmark",
                                str(tmp_path / "split" / "vicuna.eval.jsonl")])
    assert held["candidates"][0]["overall"]["win"] == 8


def test_two_halves_of_different_splits_are_refused_never_paired(tmp_path):
    from codeclm_beam.model.errors import ConfigurationError
    from codeclm_beam.pipelines.commands.split import held_out_of
    path = write_vicuna(tmp_path / "vicuna.jsonl", {"math": 10, "coding": 10})
    first = split_file(str(path), str(tmp_path / "split"), 0.2, seed=3)
    assert held_out_of(first["files"]["seeds"]) == first["files"]["eval"]
    eval_before = (tmp_path / "split" / "vicuna.eval.jsonl").read_bytes()
    # A second split into the folder, killed between its two files: new seeds, old eval.
    split_file(str(path), str(tmp_path / "split"), 0.3, seed=4)
    (tmp_path / "split" / "vicuna.eval.jsonl").write_bytes(eval_before)
    with pytest.raises(ConfigurationError, match="two different splits"):
        held_out_of(first["files"]["seeds"])
    assert not list((tmp_path / "split").glob("*.tmp"))  # each file written whole
