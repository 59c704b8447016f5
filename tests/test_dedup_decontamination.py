"""Deduplication and decontamination: alone on any rows, and inside `generate`, where
what they remove is never paid for and every removal is accounted for."""
import glob
import json
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam import textmatch
from codeclm_beam.pipelines.commands.show import Run
from codeclm_beam.pipelines.commands.show import trace
from codeclm_beam.pipelines.commands.split import split_file
from codeclm_beam.transforms.decontaminate import Decontaminate
from codeclm_beam.transforms.decontaminate import DecontaminationRule
from codeclm_beam.transforms.dedup import DeduplicateInstructions
from tests.helpers import calls_by_kind
from tests.helpers import collect
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import write_seeds

LABELLED = os.path.join(os.path.dirname(__file__), "fixtures", "near_duplicates.jsonl")


def _labelled_rows():
    """The labelled pairs as rows with ids, each text once, plus exact duplicates
    (case, punctuation, spacing) of the first three texts."""
    with open(LABELLED) as f:
        pairs = [json.loads(line) for line in f]
    ids, rows = {}, []
    for pair in pairs:
        for text in (pair["a"], pair["b"]):
            if text not in ids:
                ids[text] = f"r{len(ids):03d}"
                rows.append({"id": ids[text], "text": text})
    exact = [{"id": f"x{i}", "text": "  " + row["text"].upper().replace(".", " !")}
             for i, row in enumerate(rows[:3])]
    truth = {frozenset((ids[p["a"]], ids[p["b"]])) for p in pairs if p["duplicate"]}
    truth |= {frozenset((f"x{i}", row["id"])) for i, row in enumerate(rows[:3])}
    return rows + exact, truth


def test_signatures_and_bands_are_datasketchs_value_for_value():
    # textmatch computes MinHash and the band choice itself (importing datasketch
    # imports scipy.integrate, a second per process); they must stay datasketch's.
    import numpy as np
    from datasketch import MinHash, MinHashLSH
    rows, _ = _labelled_rows()
    gram_sets = [[], ["one"], *(textmatch.ngrams(textmatch.words(r["text"]), 3)
                                for r in rows[:6])]
    for num_perm, seed in ((128, 1), (64, 7)):
        for grams in gram_sets:
            theirs = MinHash(num_perm=num_perm, seed=seed)
            theirs.update_batch([g.encode("utf-8") for g in grams])
            ours = textmatch.signature(grams, num_perm, seed)
            assert ours.dtype == theirs.hashvalues.dtype
            assert np.array_equal(ours, theirs.hashvalues), (num_perm, grams[:2])
    for num_perm in (16, 100, 128, 256):
        for threshold in (0.3, 0.5, 0.65, 0.7, 0.8, 0.9, 0.95):
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm,
                             weights=textmatch.LSH_WEIGHTS)
            assert textmatch.lsh_bands(threshold, num_perm) == (lsh.b, lsh.r)
    # Where datasketch refuses (one band), the one band is the whole signature:
    # threshold 1 proposes only pairs whose signatures are equal.
    assert textmatch.lsh_bands(1.0, 128) == (1, 128)


def test_near_duplicates_are_caught_and_distinct_instructions_kept():
    rows, truth = _labelled_rows()
    got = collect(lambda p: dict(zip(("kept", "removed"), p
                                     | beam.Create(rows)
                                     | DeduplicateInstructions(text="text", key="id"))))
    found = {frozenset((r.removal.element_id, r.removal.duplicate_of)): r.removal
             for r in got["removed"]}
    true_positives = set(found) & truth
    precision, recall = len(true_positives) / len(found), len(true_positives) / len(truth)
    # Measured: precision 0.95, recall 0.65 at the defaults (word 1-grams, 0.8); 0.94
    # and 0.61 on the labelled pairs alone.
    assert precision >= 0.9 and recall >= 0.55, (precision, recall)
    # Exact duplicates (by normalised text) are always caught, named, similarity 1.
    for i, row in enumerate(rows[:3]):
        assert found[frozenset((f"x{i}", row["id"]))].similarity == 1.0
    # Nothing lost: every row is kept or removed, once.
    assert len(got["kept"]) + len(got["removed"]) == len(rows)
    assert {r["id"] for r in got["kept"]}.isdisjoint(r.element["id"] for r in got["removed"])


def _synthetic(n: int, every: int):
    """n instructions, every `every`-th a reworded copy of an earlier one."""
    rows = []
    for i in range(n):
        if i % every == every - 1:
            text = "Please, " + rows[i // 2]["text"].lower()
        else:
            text = (f"Write task {i} about {'abcdefghij'[i % 10]}{i} and "
                    f"{'klmnopqrst'[(i * 7) % 10]}{i * 3} for reader {i * 11}")
        rows.append({"id": f"e{i:04d}", "text": text})
    return rows


def _run_to_files(rows, out, options):
    with beam.Pipeline(options=PipelineOptions(options)) as p:
        result = p | beam.Create(rows, reshuffle=True) | DeduplicateInstructions(
            text="text", key="id")
        result.kept | "KeptIds" >> beam.Map(lambda r: r["id"]) | "WriteKept" >> \
            beam.io.WriteToText(os.path.join(out, "kept"))
        result.removed | "RemovedIds" >> beam.Map(
            lambda r: f"{r.removal.element_id} {r.removal.duplicate_of}") | \
            "WriteRemoved" >> beam.io.WriteToText(os.path.join(out, "removed"))


def _lines(out, name):
    lines = []
    for path in glob.glob(os.path.join(out, name + "*")):
        with open(path) as f:
            lines += f.read().split()
    return sorted(lines)


def test_many_workers_keep_the_same_set_as_one(tmp_path):
    rows = _synthetic(240, every=4)
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    _run_to_files(rows, one, ["--direct_num_workers=1"])
    _run_to_files(rows, many, ["--direct_num_workers=2",
                               "--direct_running_mode=multi_processing"])
    assert _lines(one, "kept") == _lines(many, "kept")
    assert _lines(one, "removed") == _lines(many, "removed")
    assert len(_lines(one, "removed")) == 2 * 60  # (id, original) per planted copy


BENCHMARK_QUESTION = ("Compose an engaging travel blog post about a recent trip to "
                      "Hawaii, highlighting cultural experiences and must-see attractions.")


def _benchmarks(tmp_path):
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question_id": 1, "turns": [BENCHMARK_QUESTION], "category": "writing"},
        {"question_id": 2, "turns": ["Hi there"], "category": "chat"}]))
    csv = tmp_path / "other.csv"
    csv.write_text("question\n\"Implement a program to find the common elements in two "
                   "arrays without using any extra data structures.\"\n")
    return [str(jsonl), str(csv)]


def test_a_planted_benchmark_question_is_caught_in_instructions_and_answers(tmp_path):
    benchmarks = _benchmarks(tmp_path)
    rows = [
        {"id": "a", "instruction": "Please " + BENCHMARK_QUESTION.lower() + " Thanks!",
         "response": "Sure."},
        {"id": "b", "instruction": "Write a poem about the sea.",
         "response": "Here: implement a program to find the common elements in two "
                     "arrays without using any extra memory."},
        {"id": "c", "instruction": "Hi there", "response": "Hello."},
    ]
    for join in ("side_input", "keyed"):
        rule = DecontaminationRule(tuple(benchmarks), join=join)
        screen = Decontaminate(rule, fields=("instruction", "response"), key="id")
        assert screen.side_input == (join == "side_input")
        got = collect(lambda p: dict(zip(("kept", "removed"),
                                         p | beam.Create(rows) | screen)))
        assert [r["id"] for r in got["kept"]] == ["c"]  # a short row is not checked
        removed = {r.removal.element_id: r.removal for r in got["removed"]}
        assert removed["a"].field == "instruction"
        assert removed["a"].benchmark_row == f"{benchmarks[0]}:1"
        assert removed["a"].overlap in textmatch.normalize(BENCHMARK_QUESTION)
        assert len(removed["a"].overlap.split()) == 8
        assert removed["b"].field == "response"
        assert removed["b"].benchmark_row == f"{benchmarks[1]}:1"


def _generate(tmp_path, name, models, *extra):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    return run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / name, "--num_metadata", "4",
        "--num_examples", "8", *extra))


def test_duplicates_are_removed_before_they_are_paid_for(tmp_path):
    # 4 entries x 2 instructions, the second of each a copy of the first: no reserve.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    models = scripted_models(tmp_path / "a", judge="strong_wins", duplicate_every=2)
    without = _generate(tmp_path / "a", "out", models, "--num_instructions", "8",
                        "--max_iterations", "1", "--no_dedup")
    models = scripted_models(tmp_path / "b", judge="strong_wins", duplicate_every=2)
    manifest = _generate(tmp_path / "b", "out", models, "--num_instructions", "8",
                         "--max_iterations", "1")
    screening = manifest["accounting"]["screening"]
    removed = screening["duplicates"]["before_judging"]
    assert removed == 4 and manifest["accounting"]["balanced"]
    calls_without, calls_with = calls_by_kind(tmp_path / "a"), calls_by_kind(tmp_path / "b")
    saved = sum(calls_without.values()) - sum(calls_with.values())
    assert saved == 4 * removed == screening["calls_saved"]
    assert calls_with["judge"] == 2 * (8 - removed)
    # Without dedup the copies became pairs; with it, each is a rejection naming the
    # kept pair it repeats, and `show` traces it there.
    assert len(read_jsonl(tmp_path / "a" / "out", "examples")) == 8
    assert without["screens"]["dedup"] is None and without["accounting"]["balanced"]
    examples = {e["example_id"]: e for e in read_jsonl(tmp_path / "b" / "out", "examples")}
    duplicates = [r for r in read_jsonl(tmp_path / "b" / "out", "rejected")
                  if r["reason"] == "duplicate"]
    assert len(duplicates) == 4 and all(d["duplicate_of"] in examples for d in duplicates)
    run = Run(str(tmp_path / "b" / "out"))
    shown = trace(run, duplicates[0], kept=False)
    assert "before any answer or judgement was paid for" in shown
    assert examples[duplicates[0]["duplicate_of"]]["instruction"][:40] in shown
    card = (tmp_path / "b" / "out" / "README.md").read_text()
    assert "## Deduplication and decontamination" in card and "4 candidates removed" in card
    report = (tmp_path / "b" / "out" / "report.html").read_text()
    assert "4 duplicates removed" in report and "16 model calls saved" in report


def test_ask_for_n_get_n_after_dedup_and_split_decontamination(tmp_path):
    # Seeds from `split`: its held-out half is checked by itself. Decode copies a
    # held-out question (as each entry's first instruction: one is contaminated, the
    # others its duplicates); the first strong answer quotes another; every 4th
    # instruction is a copy; the reserve and later rounds make up for what was removed.
    bench = tmp_path / "bench.jsonl"
    questions = [f"Explain how topic number {i} shapes the daily work of a "
                 f"{['nurse', 'pilot', 'farmer', 'teacher'][i % 4]} in a large city today"
                 for i in range(20)]
    bench.write_text("".join(json.dumps({"question_id": i, "turns": [q]}) + "\n"
                             for i, q in enumerate(questions)))
    parts = split_file(str(bench), str(tmp_path / "split"), seed_fraction=0.25)["files"]
    held_out = [json.loads(line)["turns"][0] for line in open(parts["eval"])]
    models = scripted_models(tmp_path, judge="strong_wins", duplicate_every=4,
                             decode_plants=held_out[0],
                             per_role={"strong": {"answer_quotes": held_out[1]}})
    manifest = run_generate(generate_args(
        tmp_path, models, parts["seeds"], tmp_path / "out", "--num_metadata", "4",
        "--num_examples", "8", "--num_instructions", "24", "--max_iterations", "4"))
    acc = manifest["accounting"]
    assert acc["balanced"], acc["checks"]
    assert manifest["delivery"]["delivered"] == 8
    assert manifest["screens"]["decontamination"]["held_out_of_split"] == parts["eval"]
    rejected = read_jsonl(tmp_path / "out", "rejected")
    dirty = [r for r in rejected if r["reason"] == "contaminated"]
    before = [r for r in dirty if r["strong_score"] is None]
    after = [r for r in dirty if r["strong_score"] is not None]
    assert before and all(r["benchmark_row"].startswith(parts["eval"]) for r in before)
    assert after and after[0]["overlap_field"] == "response"
    assert acc["screening"]["contaminated"]["final_pairs"] == len(after)
    assert acc["screening"]["duplicates"]["before_judging"] >= 2
    examples = read_jsonl(tmp_path / "out", "examples")
    assert not any(held_out[0].lower()[:30] in e["instruction"].lower() for e in examples)
    assert "picked up by itself" in (tmp_path / "out" / "README.md").read_text()


def test_both_screens_run_alone_in_beam_yaml(tmp_path):
    from apache_beam.yaml import main as yaml_main
    example = os.path.join(os.path.dirname(__file__), "..", "examples",
                           "screen_corpus.beam.yaml")
    benchmark = _benchmarks(tmp_path)[0]
    out = tmp_path / "out"
    yaml_main.run(argv=[f"--yaml_pipeline_file={example}", "--jinja_variables="
                        + json.dumps({"benchmark": benchmark, "out": str(out)})])

    def rows(name):
        return [json.loads(line) for path in sorted(glob.glob(str(out / f"{name}*")))
                for line in open(path) if line.strip()]
    assert sorted(r["id"] for r in rows("clean")) == ["1", "4"]
    removed = {r["element_id"]: r for r in rows("removed")}
    assert removed["2"]["reason"] == "duplicate" and removed["2"]["duplicate_of"] == "1"
    assert removed["3"]["reason"] == "contaminated"
    assert removed["3"]["benchmark_row"] == f"{benchmark}:1"
    assert rows("bad_benchmark_rows") == []
