"""Deduplication at scale: `DeduplicateInstructions` on the DirectRunner (one worker)
against datasketch's in-memory MinHashLSH, on the same synthetic instructions with
planted exact and near duplicates. Each side runs in its own process, so its peak
memory is its own.

    python -m benchmarks.dedup beam|baseline N   -> one side's figures, as JSON
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from codeclm_beam import textmatch
from codeclm_beam.transforms.dedup import DedupRule

VOCABULARY = [f"w{i}" for i in range(5000)]
# Of every ten instructions: one an exact copy (case, punctuation) of an earlier one,
# one a near copy (a word more).
EXACT_EVERY, NEAR_EVERY = 10, 10


def instructions(n: int) -> tuple[list[dict], dict[str, str]]:
    """n rows {id, text}, and the planted copies: copy id -> original id."""
    rng = random.Random(7)
    rows, planted = [], {}
    for i in range(n):
        if i > 10 and i % EXACT_EVERY == 3:
            original = rows[rng.randrange(i - 1)]
            text = original["text"].upper() + " !"
        elif i > 10 and i % NEAR_EVERY == 7:
            original = rows[rng.randrange(i - 1)]
            words = original["text"].split()
            words.insert(rng.randrange(len(words)), "please")
            text = " ".join(words)
        else:
            original = None
            text = "Write " + " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(12, 20)))
        row = {"id": f"i{i:07d}", "text": text}
        if original is not None:
            planted[row["id"]] = original["id"]
        rows.append(row)
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
    """The same rule with one in-memory index: exact texts by a dict, then each row in
    key order queried against MinHashLSH (the same bands), the proposed rows compared
    exactly, and every row inserted."""
    from datasketch import MinHash
    from datasketch import MinHashLSH
    rule = DedupRule()
    bands, rows_per_band = rule.bands
    lsh = MinHashLSH(num_perm=rule.num_perm, params=(bands, rows_per_band))
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
    return {"instructions": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "instructions_per_s": round(n / wall), "instructions_per_cpu_s": round(n / cpu),
            "removed": len(removed), "planted": len(planted),
            "recall": round(len(found) / len(planted), 4),
            "precision": round(len(found) / len(removed), 4) if removed else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "removed_ids": sorted(removed)}


def dedup(n: int) -> dict[str, Any]:
    """Both sides on the same n instructions, side by side."""
    results = {}
    for name in ("beam", "baseline"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.dedup", name, str(n)],
                              check=True, capture_output=True, text=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    beam_ids = set(results["beam"].pop("removed_ids"))
    base_ids = set(results["baseline"].pop("removed_ids"))
    results["same_removed_set"] = beam_ids == base_ids
    results["throughput_beam_over_baseline"] = round(
        results["beam"]["instructions_per_cpu_s"]
        / results["baseline"]["instructions_per_cpu_s"], 3)
    results["peak_memory_beam_over_baseline"] = round(
        results["beam"]["peak_rss_mb"] / results["baseline"]["peak_rss_mb"], 3)
    return results


if __name__ == "__main__":
    print(json.dumps(side(sys.argv[1], int(sys.argv[2]))))
