"""Deduplication at scale: `DeduplicateInstructions` on the DirectRunner (one worker)
against datasketch's in-memory MinHashLSH at the same threshold, on the same synthetic
instructions with planted exact copies and near copies at the threshold, 0.02 above it
and at 0.9 (recall reported for each). Each side runs in its own process, so its peak
memory is its own.

    python -m benchmarks.dedup beam|baseline N   -> one side's figures, as JSON
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any
from typing import Optional

from benchmarks.peak_memory import high_water_mb
from codeclm_beam import textmatch
from codeclm_beam.transforms.dedup import DedupRule

VOCABULARY = [f"w{i}" for i in range(5000)]
# In every ten rows, four planted copies of an earlier row: an exact copy (case,
# punctuation), and near copies at exactly Jaccard 0.8 (the default threshold), 0.82
# and 0.9 of their word sets: an original of k distinct words, the copy with m more,
# k / (k + m) the similarity.
NEAR = {"0.80": (16, 4), "0.82": (41, 9), "0.90": (18, 2)}
KINDS = ("exact", *NEAR)


def instructions(n: int) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """n rows {id, text}, and the planted copies: copy id -> (original id, kind)."""
    rng = random.Random(7)
    rows, planted = [], {}

    def add(text: str, original: Optional[dict] = None, kind: str = "") -> dict:
        row = {"id": f"i{len(rows):07d}", "text": text}
        if original is not None:
            planted[row["id"]] = (original["id"], kind)
        rows.append(row)
        return row

    while len(rows) < n:
        at = len(rows) % 10
        if len(rows) > 10 and at == 1:
            original = rows[rng.randrange(len(rows) - 1)]
            add(original["text"].upper() + " !", original, "exact")
        elif at in (3, 5, 7) and len(rows) + 1 < n:
            kind = list(NEAR)[(at - 3) // 2]
            shared, more = NEAR[kind]
            chosen = rng.sample(VOCABULARY, shared + more)
            original = add("Write " + " ".join(chosen[:shared - 1]))
            copy = chosen[:shared - 1] + chosen[shared:]
            rng.shuffle(copy)
            add("Write " + " ".join(copy), original, kind)
        else:
            add("Write " + " ".join(rng.choice(VOCABULARY)
                                    for _ in range(rng.randint(12, 20))))
    return rows, planted


def _beam(rows: list[dict]) -> dict[str, str]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from codeclm_beam.transforms.dedup import DeduplicateInstructions
    out = tempfile.mkdtemp()
    with beam.Pipeline(options=PipelineOptions(["--direct_num_workers=1"])) as p:
        result = p | beam.Create(rows) | DeduplicateInstructions(text="text", key="id")
        (result.removed
         | beam.Map(lambda r: f"{r.removal.element_id} {r.removal.duplicate_of}")
         | beam.io.WriteToText(os.path.join(out, "removed")))
    removed = {}
    for name in os.listdir(out):
        with open(os.path.join(out, name)) as f:
            for line in f:
                element, original = line.split()
                removed[element] = original
    return removed


def _baseline(rows: list[dict]) -> dict[str, str]:
    """The same rule with one in-memory index, as a user of datasketch would write it:
    exact texts by a dict, then each row in key order queried against
    MinHashLSH(threshold, num_perm) with its own choice of bands, the proposed rows
    compared exactly, and every row inserted."""
    from datasketch import MinHash
    from datasketch import MinHashLSH
    rule = DedupRule()
    lsh = MinHashLSH(threshold=rule.threshold, num_perm=rule.num_perm)
    removed, first_of_text, shingles = {}, {}, {}
    for row in sorted(rows, key=lambda r: r["id"]):
        normalized = textmatch.normalize(row["text"])
        if normalized in first_of_text:
            removed[row["id"]] = first_of_text[normalized]
            continue
        first_of_text[normalized] = row["id"]
        grams = textmatch.ngrams(normalized.split(), rule.ngram_size)
        minhash = MinHash(num_perm=rule.num_perm, seed=rule.seed)
        minhash.update_batch([g.encode("utf-8") for g in grams])
        mine = frozenset(grams)
        matches = sorted(key for key in lsh.query(minhash)
                         if textmatch.jaccard(shingles[key], mine) >= rule.threshold)
        if matches:
            removed[row["id"]] = matches[0]
        lsh.insert(row["id"], minhash)
        shingles[row["id"]] = mine
    return removed


def side(name: str, n: int) -> dict[str, Any]:
    rows, planted = instructions(n)
    started, cpu = time.time(), time.process_time()
    removed = (_beam if name == "beam" else _baseline)(rows)
    wall, cpu = time.time() - started, time.process_time() - cpu
    found = set(removed) & set(planted)
    recall = {kind: round(sum(1 for copy in found if planted[copy][1] == kind)
                          / sum(1 for _, k in planted.values() if k == kind), 4)
              for kind in KINDS}
    return {"instructions": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "instructions_per_s": round(n / wall), "instructions_per_cpu_s": round(n / cpu),
            "removed": len(removed), "planted": len(planted), "recall": recall,
            "precision": round(len(found) / len(removed), 4) if removed else None,
            # Its own peak: getrusage's would read the bench process's size
            # (benchmarks/peak_memory.py).
            "peak_rss_mb": round(high_water_mb())}


def dedup(n: int) -> dict[str, Any]:
    """Both sides on the same n instructions, side by side, each in its own process."""
    results = {}
    for name in ("beam", "baseline"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.dedup", name, str(n)],
                              check=True, capture_output=True, text=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    rule = DedupRule()
    results["threshold"] = rule.threshold
    results["bands"] = list(rule.bands)
    results["miss_rate_at_threshold"] = round(textmatch.miss_rate(rule.threshold,
                                                                  *rule.bands), 5)
    results["throughput_beam_over_baseline"] = round(
        results["beam"]["instructions_per_cpu_s"]
        / results["baseline"]["instructions_per_cpu_s"], 3)
    results["peak_memory_beam_over_baseline"] = round(
        results["beam"]["peak_rss_mb"] / results["baseline"]["peak_rss_mb"], 3)
    return results


if __name__ == "__main__":
    print(json.dumps(side(sys.argv[1], int(sys.argv[2]))))
