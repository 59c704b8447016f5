"""`codeclm-beam split`: a benchmark file into a seed part and an evaluation part
(default 20/80, seeded, stratified by category where the layout has one), as the paper
did. Rows of the seed part are marked, and `evaluate` refuses them unless told to.

The two files are written one after the other, each whole (a temporary name, then a
rename; one object upload on gs://); every row carries the split's id, so a reader
that pairs them (`held_out_of`) refuses two halves of different splits, as a kill
between the two writes into a folder an earlier split wrote would leave."""
from __future__ import annotations

import collections
import hashlib
import json
import random
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.outputs import write_text
from codeclm_beam.transforms.evaluate import SPLIT_MARKER
from codeclm_beam.transforms.evaluate import benchmark_name
from codeclm_beam.transforms.evaluate import detect_file_layout
from codeclm_beam.rows import RowError
from codeclm_beam.rows import jsonl_rows
from codeclm_beam.pipelines.run.args import SuggestingParser

# The two parts' file names, after the benchmark's.
SEEDS_SUFFIX, EVAL_SUFFIX = ".seeds.jsonl", ".eval.jsonl"
# Which split a row came from: the same in both halves of one split.
SPLIT_ID = "codeclm_split_id"


def split_rows(rows: list[dict], category_field: Optional[str], seed_fraction: float,
               seed: int, same: Optional[list[str]] = None
               ) -> tuple[list[dict], list[dict]]:
    """Seed and held-out rows. Rows with the same `same` key (the normalised
    instruction) go to one side together: the same question under two ids on both
    sides would be seeded and then evaluated on."""
    same = same or [str(i) for i in range(len(rows))]
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for index, key in enumerate(same):
        groups[key].append(index)
    by_category: dict[str, list[str]] = collections.defaultdict(list)
    for key, indexes in groups.items():
        row = rows[indexes[0]]
        by_category[str(row.get(category_field)) if category_field else ""].append(key)
    rng = random.Random(seed)
    seed_indexes = set()
    for category in sorted(by_category):
        keys = by_category[category]
        rng.shuffle(keys)
        for key in keys[:round(seed_fraction * len(keys))]:
            seed_indexes.update(groups[key])
    seeds = [dict(rows[i], **{SPLIT_MARKER: "seeds"}) for i in sorted(seed_indexes)]
    held_out = [dict(rows[i], **{SPLIT_MARKER: "eval"}) for i in range(len(rows))
                if i not in seed_indexes]
    return seeds, held_out


def split_file(path: str, output_dir: str, seed_fraction: float = 0.2, seed: int = 0,
               instruction_field: Optional[str] = None) -> dict:
    layout = detect_file_layout(path, instruction_field, flag="--instruction_field")
    with FileSystems.open(path) as handle:
        rows = []
        for source, row in jsonl_rows(path, handle):
            if isinstance(row, RowError) or not isinstance(row, dict):
                raise ValueError(f"{source}: {row if isinstance(row, RowError) else 'not an object'}")
            rows.append(row)
    same = [" ".join(str(layout.instruction(r) or "").split()).casefold() for r in rows]
    seeds, held_out = split_rows(rows, layout.category_field, seed_fraction, seed, same)
    if not seeds or not held_out:
        raise ConfigurationError(
            f"--seed_fraction {seed_fraction:g} of {len(rows)} rows leaves "
            f"{'no seed row' if not seeds else 'nothing to evaluate on'}; choose a "
            "fraction that leaves rows on both sides")
    split_id = hashlib.sha256(json.dumps(
        [rows, seed_fraction, seed, instruction_field], sort_keys=True,
        default=str).encode()).hexdigest()[:12]
    seeds, held_out = ([dict(row, **{SPLIT_ID: split_id}) for row in part]
                       for part in (seeds, held_out))
    name = benchmark_name(path)
    outputs = {"seeds": FileSystems.join(output_dir, name + SEEDS_SUFFIX),
               "eval": FileSystems.join(output_dir, name + EVAL_SUFFIX)}
    for part, part_rows in (("seeds", seeds), ("eval", held_out)):
        write_text(outputs[part], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in part_rows), "application/jsonl")
    return {"benchmark": name, "layout": layout.name, "rows": len(rows),
            "seeds": len(seeds), "eval": len(held_out), "stratified_by":
            layout.category_field if any(layout.category_field in r for r in rows)
            else None, "files": outputs}


def held_out_of(seeds: str) -> Optional[str]:
    """The held-out half `split` wrote beside a seed file it wrote, or None (the seeds
    are not a split's, or the other half is not there). Two halves of different
    splits are refused."""
    if not seeds.endswith(SEEDS_SUFFIX) or any(c in seeds for c in "*?["):
        return None
    held_out = seeds[:-len(SEEDS_SUFFIX)] + EVAL_SUFFIX
    try:
        if not FileSystems.exists(held_out):
            return None
        first = {path: _first_row(path) for path in (seeds, held_out)}
    except Exception:  # unreadable seeds fail where they are read, with the reason
        return None
    if first[seeds].get(SPLIT_MARKER) != "seeds":
        return None
    if first[seeds].get(SPLIT_ID) != first[held_out].get(SPLIT_ID):
        raise ConfigurationError(
            f"{seeds} and {held_out} come from two different splits (one was cut short "
            "between its two files): run `codeclm-beam split` again")
    return held_out


def _first_row(path: str) -> dict:
    with FileSystems.open(path) as handle:
        for _, row in jsonl_rows(path, handle):
            return row if isinstance(row, dict) else {}
    return {}


def split_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam split", description=__doc__)
    parser.add_argument("benchmark", help="Benchmark JSONL file (local or gs://).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instruction_field", default=None)
    args = parser.parse_args(argv)
    if not 0 < args.seed_fraction < 1:
        parser.error("--seed_fraction must lie between 0 and 1")
    result = split_file(args.benchmark, args.output_dir, args.seed_fraction, args.seed,
                        args.instruction_field)
    print(json.dumps(result, indent=2))
    return 0
