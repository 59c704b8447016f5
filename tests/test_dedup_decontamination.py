"""Deduplication and decontamination: alone on any rows, and inside `generate`, where
what they remove is never paid for and every removal is accounted for."""
import glob
import json
import os
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam import textmatch
from codeclm_beam.pipelines.cli import _summary
from codeclm_beam.pipelines.commands.show import Run
from codeclm_beam.pipelines.commands.show import trace
from codeclm_beam.pipelines.commands.split import split_file
from codeclm_beam.transforms.decontaminate import Decontaminate
from codeclm_beam.transforms.decontaminate import DecontaminationRule
from codeclm_beam.metrics import DEDUP
from codeclm_beam.metrics import REFERENCE_BUCKETS_SENT
from codeclm_beam.metrics import REFERENCE_BUCKETS_SKIPPED
from codeclm_beam.transforms.dedup import DedupRule
from codeclm_beam.transforms.dedup import DeduplicateInstructions
from tests.helpers import calls_by_kind
from tests.helpers import collect
from tests.helpers import collect_counting
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.scripted_backend import read_calls

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


def test_signatures_are_datasketchs_value_for_value():
    # textmatch computes MinHash itself (importing datasketch imports scipy.integrate,
    # a second per process); its signatures must stay datasketch's.
    import numpy as np
    from datasketch import MinHash
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


def test_the_bands_miss_a_pair_at_the_threshold_less_than_one_time_in_a_hundred():
    # By construction: of the bandings that fit, the one proposing fewest pairs below
    # the threshold among those whose miss rate at it is at most 0.5%.
    for num_perm in (16, 64, 128, 256):
        for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
            bands, rows = textmatch.lsh_bands(threshold, num_perm)
            assert bands * rows <= num_perm
            assert textmatch.miss_rate(threshold, bands, rows) <= 0.005
            # The fewest bands that keep the promise (each band more proposes more
            # pairs below the threshold).
            assert textmatch.miss_rate(threshold, bands - 1, rows) > 0.005
    with pytest.raises(ValueError, match="more permutations"):
        textmatch.lsh_bands(0.5, 4)
    # Measured, not only computed: 600 planted pairs at exactly Jaccard 0.8 (16 shared
    # words, 4 added), signatures as the transform makes them.
    bands, rows = textmatch.lsh_bands(0.8, 128)
    draw = random.Random(3)
    missed = 0
    for i in range(600):
        base = [f"w{i}x{k}" for k in range(16)]
        copy = base + [f"v{i}x{k}" for k in range(4)]
        draw.shuffle(copy)
        assert textmatch.jaccard(frozenset(base), frozenset(copy)) == 0.8
        keys = [set(textmatch.band_keys(textmatch.signature(grams, 128, 1), bands, rows))
                for grams in (base, copy)]
        missed += not keys[0] & keys[1]
    assert missed <= 6, missed  # expected 0.42% of 600: 2.5
    # Threshold 1: one band, the whole signature (only equal signatures are proposed).
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
    # Measured: precision 0.95, recall 0.68 at the defaults (word 1-grams, 0.8); 0.95
    # and 0.64 on the labelled pairs alone (every labelled pair at 0.8 or above).
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


def _screen_against(references, elements, rule=DedupRule()):
    """DeduplicateInstructions of `elements` against `references`: what it kept and
    removed, and its reference-bucket counters {name: value}."""
    return collect_counting(lambda p: dict(zip(("kept", "removed"), (
        p | "Elements" >> beam.Create(elements)
        | DeduplicateInstructions(text="text", key="id", rule=rule, against=(
            p | "References" >> beam.Create(references)))))), DEDUP)


def test_references_are_sent_only_into_the_buckets_an_element_is_in():
    # A later round's screen: many candidates judged before, few new ones. A reference
    # alone in a bucket is compared with nothing, so it is not regrouped at all.
    draw = random.Random(7)
    words = [f"{a}{b}{c}" for a in "bdgklmnprst" for b in "aeiou" for c in "bdgklmnprstz"]
    references = [{"id": f"j{i:03d}", "text": " ".join(draw.sample(words, 12))}
                  for i in range(200)]
    elements = [{"id": "n0", "text": references[5]["text"].upper() + " !"},
                {"id": "n1", "text": "Please, " + references[7]["text"].lower()},
                {"id": "n2", "text": "Plant tulips in autumn before the ground freezes"}]
    per_reference = 1 + DedupRule().bands[0]  # its exact bucket and its bands
    got, counters = _screen_against(references, elements)
    assert [row["id"] for row in got["kept"]] == ["n2"]
    assert sorted((r.removal.element_id, r.removal.duplicate_of) for r in got["removed"]) \
        == [("n0", references[5]["id"]), ("n1", references[7]["id"])]
    sent = counters[REFERENCE_BUCKETS_SENT]
    # Only the two references repeated share buckets with an element (a 32-bit digest
    # collision could add one more): before, all 200 went into all their buckets.
    assert 2 <= sent <= 2 * per_reference + 1, counters
    assert sent + counters[REFERENCE_BUCKETS_SKIPPED] == len(references) * per_reference

    # No element at all (a round with no candidate left): no reference is sent. A
    # reference shorter than the n-grams is one n-gram, so it has its bands too.
    got, counters = _screen_against(references + [{"id": "short", "text": "Hi there"}], [],
                                    DedupRule(ngram_size=3))
    assert not got.get("kept") and not got.get("removed")
    assert counters.get(REFERENCE_BUCKETS_SENT, 0) == 0
    assert counters[REFERENCE_BUCKETS_SKIPPED] == (len(references) + 1) * per_reference


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
    words = BENCHMARK_QUESTION.rstrip(".").split()
    edited = words[:7] + ["one"] + words[8:15] + ["famous"] + words[16:]  # no 8-gram left
    scrambled = words[:3] + words[:2:-1]  # the same words, one 3-gram in common
    rows = [
        {"id": "a", "instruction": "Please " + BENCHMARK_QUESTION.lower() + " Thanks!",
         "response": "Sure."},
        {"id": "b", "instruction": "Write a poem about the sea.",
         "response": "Here: implement a program to find the common elements in two "
                     "arrays without using any extra memory."},
        {"id": "c", "instruction": "HI, there!", "response": "Hello."},
        {"id": "d", "instruction": " ".join(edited), "response": "Done."},
        {"id": "e", "instruction": " ".join(scrambled), "response": "Done."},
        # Only the topic in common: kept.
        {"id": "f", "instruction": "Write a travel blog post about a weekend in Paris "
                                   "and the museums worth a visit.", "response": "Ok."},
    ]
    for join in ("side_input", "keyed"):
        rule = DecontaminationRule(tuple(benchmarks), join=join)
        screen = Decontaminate(rule, fields=("instruction", "response"), key="id")
        assert screen.side_input == (join == "side_input")
        got = collect(lambda p: dict(zip(("kept", "removed"),
                                         p | beam.Create(rows) | screen)))
        assert [r["id"] for r in got["kept"]] == ["f"]
        removed = {r.removal.element_id: r.removal for r in got["removed"]}
        assert removed["a"].field == "instruction" and removed["a"].rule == "shared_8_gram"
        assert removed["a"].benchmark_row == f"{benchmarks[0]}:1"
        assert removed["a"].overlap in textmatch.normalize(BENCHMARK_QUESTION)
        assert len(removed["a"].overlap.split()) == 8
        assert removed["b"].field == "response"
        assert removed["b"].benchmark_row == f"{benchmarks[1]}:1"
        # A row under 5 words is compared whole (it was never checked before).
        assert removed["c"].rule == "same_text" and removed["c"].benchmark_row.endswith(":2")
        # Two words changed: no 8-gram in common, but most of the row's 3-grams.
        assert removed["d"].rule == "share_of_3_grams" and removed["d"].similarity >= 0.5
        assert removed["d"].matched_text == textmatch.normalize(BENCHMARK_QUESTION)
        assert removed["e"].rule == "near" and removed["e"].similarity == 1.0


def test_light_edits_of_benchmark_questions_are_caught_and_shared_topics_kept():
    # The measurement make bench reports: 40 questions, each edited four ways, and 40
    # instructions that only share a question's topic.
    from benchmarks.decontamination import measure
    figures = measure()
    rule, old = figures["rule"], figures["single_8_gram"]
    assert rule["casing_and_punctuation"] == rule["clause_added"] == 1.0
    assert rule["one_word_changed"] >= 0.95 and rule["two_words_changed"] >= 0.75
    assert rule["same_topic"] <= 0.05
    # The single-8-gram rule it replaced misses a quarter of one-word edits.
    assert old["one_word_changed"] <= 0.8 and old["two_words_changed"] <= 0.5


def _generate(tmp_path, name, models, *extra):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    return run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / name, "--num_metadata", "4",
        "--num_examples", "8", *extra))


def test_a_near_duplicate_of_a_candidate_judged_in_an_earlier_round_costs_nothing(tmp_path):
    # Every answer ties: round 1 judges 4 candidates and improves them all away; round 2
    # draws fresh ones from the reserve, some copies of what round 1 judged.
    models = scripted_models(tmp_path, judge="tie", duplicate_every=2)
    manifest = _generate(tmp_path, "out", models, "--num_instructions", "16",
                         "--max_iterations", "2", "--num_examples", "2",
                         "--overgenerate_margin", "2")
    rejected = read_jsonl(tmp_path / "out", "rejected")
    judged_in_round_1 = {r["candidate_id"]: textmatch.normalize(r["history"][0])
                         for r in rejected if r["iteration"] == 2}
    duplicates = [r for r in rejected if r["reason"] == "duplicate"]
    later = [d for d in duplicates if d["duplicate_of"] in judged_in_round_1]
    assert len(later) == 2, duplicates
    prompts = [c["prompt"] for c in read_calls(tmp_path / "calls")
               if c["kind"] in ("answer", "judge")]
    for duplicate in later:
        # Compared with the text that was judged, not the text it was improved into,
        # and the evidence says so.
        assert duplicate["matched_text"] == judged_in_round_1[duplicate["duplicate_of"]]
        assert not any(duplicate["instruction"] in prompt for prompt in prompts)
        shown = trace(Run(str(tmp_path / "out")), duplicate, kept=False)
        assert duplicate["matched_text"] in shown
    screening = manifest["accounting"]["screening"]
    assert screening["calls_saved"] == 4 * screening["duplicates"]["before_judging"]
    # Each repeat of a judged candidate was found in a bucket its reference was sent to.
    assert screening["reference_buckets"]["sent"] >= len(later)
    assert manifest["accounting"]["balanced"]


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
    assert duplicates[0]["matched_text"] == textmatch.normalize(
        examples[duplicates[0]["duplicate_of"]]["instruction"])
    assert duplicates[0]["matched_text"][:40] in shown
    card = (tmp_path / "b" / "out" / "README.md").read_text()
    assert "## Deduplication and decontamination" in card and "4 candidates removed" in card
    report = (tmp_path / "b" / "out" / "report.html").read_text()
    assert "4 duplicates removed" in report and "16 model calls saved" in report


def test_a_seed_that_is_a_benchmark_question_is_reported_and_not_encoded(tmp_path):
    bench = _benchmarks(tmp_path)
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    with open(seeds, "a") as f:
        f.write(json.dumps({"instruction": BENCHMARK_QUESTION}) + "\n")
    for keep in (False, True):
        scenario, out = tmp_path / f"models-{keep}", tmp_path / f"out-{keep}"
        scenario.mkdir()
        models = scripted_models(scenario, judge="strong_wins")
        manifest = run_generate(generate_args(
            scenario, models, seeds, out, "--num_metadata", "4", "--num_examples", "2",
            "--max_iterations", "1", "--decontaminate", bench[0],
            *(["--keep_contaminated_seeds"] if keep else [])))
        seeds_acc = manifest["accounting"]["seeds"]
        assert manifest["accounting"]["balanced"], manifest["accounting"]["checks"]
        assert seeds_acc["contaminated"] == 1 and seeds_acc["contaminated_encoded"] is keep
        assert seeds_acc["encoded"] == (5 if keep else 4)
        encoded = [c["prompt"] for c in read_calls(scenario / "calls")
                   if c["kind"] == "encode"]
        assert any(BENCHMARK_QUESTION in prompt for prompt in encoded) is keep
        (removal,) = read_jsonl(out, "contaminated_seeds")
        assert removal["reason"] == "contaminated"
        assert removal["benchmark_row"] == f"{bench[0]}:1"
        assert removal["overlap"] in textmatch.normalize(BENCHMARK_QUESTION)
        assert ("1 seeds match a --decontaminate file" in _summary(manifest)) and (
            ("encoded anyway" if keep else "left out of encoding") in _summary(manifest))


def test_ask_for_n_get_n_after_dedup_and_split_decontamination(tmp_path):
    # Seeds from `split`: its held-out half is checked by itself. Decode copies a
    # held-out question (as each entry's first instruction: one is contaminated, the
    # others its duplicates); the first strong answer quotes another; every 4th
    # instruction is a copy; the reserve and later rounds make up for what was removed.
    bench = tmp_path / "bench.jsonl"
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "contamination",
                           "questions.jsonl")) as f:
        questions = [json.loads(line)["turns"][0] for line in f][:20]
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
    # `show` names the rule, the row, what they share and the row's text.
    shown = trace(Run(str(tmp_path / "out")), before[0], kept=False)
    assert before[0]["benchmark_row"] in shown and before[0]["matched_text"] in shown
    assert before[0]["contamination_rule"] and "contaminated" in shown
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
