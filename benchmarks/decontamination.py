"""Decontamination against light edits: the 40 benchmark-style questions of
tests/fixtures/contamination/questions.jsonl, each edited as a generator or a user
would (one word changed, two words changed, a clause added, casing and punctuation),
screened by `Decontaminate` at its defaults; and 40 instructions that merely share a
question's topic (same_topic.jsonl), which it should keep. The single-8-gram rule it
replaced (open-r1's) is measured beside it on the same texts.

    python -m benchmarks.decontamination   -> the figures, as JSON
"""
from __future__ import annotations

import json
import os
import random
from typing import Any

import apache_beam as beam

from codeclm_beam import textmatch
from codeclm_beam.transforms.decontaminate import Decontaminate
from codeclm_beam.transforms.decontaminate import DecontaminationRule

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                        "contamination")
QUESTIONS = os.path.join(FIXTURES, "questions.jsonl")
SAME_TOPIC = os.path.join(FIXTURES, "same_topic.jsonl")
# Words an edit puts in place of the question's own.
REPLACEMENTS = ("certain", "simple", "main", "good", "usual", "real")


def _change_words(words: list[str], how_many: int, rng: random.Random) -> list[str]:
    edited = list(words)
    for place in rng.sample(range(len(words)), min(how_many, len(words))):
        edited[place] = next(w for w in REPLACEMENTS if w != words[place].lower())
    return edited


def edits(question: str, rng: random.Random) -> dict[str, str]:
    words = question.split()
    return {
        "one_word_changed": " ".join(_change_words(words, 1, rng)),
        "two_words_changed": " ".join(_change_words(words, 2, rng)),
        "clause_added": question.rstrip("?.!") + ", and give one example from daily life.",
        "casing_and_punctuation": question.upper().replace(",", "").rstrip("?.!") + " !!",
    }


def edited_questions(seed: int = 11) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    with open(QUESTIONS) as f:
        for line in f:
            question = json.loads(line)["turns"][0]
            rows += [{"id": f"{kind}:{len(rows)}", "kind": kind, "instruction": text}
                     for kind, text in edits(question, rng).items()]
    return rows


def same_topic() -> list[dict[str, str]]:
    with open(SAME_TOPIC) as f:
        return [{**json.loads(line), "kind": "same_topic"} for line in f]


def _old_rule(rows: list[dict], n: int = 8) -> set[str]:
    """open-r1's rule: any shared word 8-gram."""
    with open(QUESTIONS) as f:
        grams = {g for line in f for g in textmatch.ngrams(
            textmatch.words(json.loads(line)["turns"][0]), n, shorter_as_one=False)}
    return {r["id"] for r in rows if grams & set(textmatch.ngrams(
        textmatch.words(r["instruction"]), n, shorter_as_one=False))}


def measure() -> dict[str, Any]:
    rows = edited_questions() + same_topic()
    removed = removed_ids(rows, DecontaminationRule((QUESTIONS,)))
    old = _old_rule(rows)
    kinds = sorted({r["kind"] for r in rows})
    result: dict[str, Any] = {"questions": len(same_topic())}
    for name, flagged in (("rule", removed), ("single_8_gram", old)):
        result[name] = {kind: round(sum(r["id"] in flagged for r in rows if r["kind"] == kind)
                                    / sum(r["kind"] == kind for r in rows), 3)
                        for kind in kinds}
    return result


def removed_ids(rows: list[dict], rule: DecontaminationRule) -> set[str]:
    import tempfile
    out = tempfile.mkdtemp()
    with beam.Pipeline() as p:
        screened = p | beam.Create(rows) | Decontaminate(rule, key="id")
        (screened.removed | beam.Map(lambda r: r.removal.element_id)
         | beam.io.WriteToText(os.path.join(out, "removed")))
    found = set()
    for name in os.listdir(out):
        with open(os.path.join(out, name)) as f:
            found |= {line.strip() for line in f if line.strip()}
    return found


if __name__ == "__main__":
    print(json.dumps(measure()))
