"""`codeclm-beam show RUN_DIR [ID]`: one kept pair or rejection of a `generate` run,
traced back through the method: the seed(s) and the metadata encoded from them, the
pool entry, its rubrics and actions, every version of the instruction with the action
that made the next, both answers, both orders' scores, the gap and the verdict.

Without ID it shows the record that went through the most improvements (a kept pair
before a rejection when they tie). It reads
only the run's outputs (and the seed file the manifest names); it calls no model.
"""
from __future__ import annotations

import textwrap
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.commit import read_committed
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir
from codeclm_beam.rows import RowError
from codeclm_beam.rows import iter_rows
from codeclm_beam.records import CONTAMINATED
from codeclm_beam.records import DUPLICATE
from codeclm_beam.records import Seed
from codeclm_beam.transforms.read_seeds import DEFAULT_MAX_CHARS
from codeclm_beam.transforms.read_seeds import make_seed


class Run:
    """A finished generate run's outputs, indexed by id."""

    def __init__(self, run_dir: str):
        committed = read_committed(run_dir)
        self.run_dir = committed.folder  # one run's files, read through the pointer once
        self.manifest = committed.record
        self.examples = self._read("examples")
        self.rejected = self._read("rejected")
        self.pool = {m["metadata_id"]: m for m in self._read("metadata_pool")}
        self.rubrics = {r["metadata_id"]: r for r in self._read("rubrics")}
        self.seed_metadata = self._read("seed_metadata")

    def _read(self, name: str) -> list[dict]:
        return read_jsonl_dir(FileSystems.join(self.run_dir, name))

    def find(self, wanted: Optional[str]) -> tuple[dict, bool]:
        """(the record, whether it was kept) for an example or candidate id (a unique
        prefix will do); without one, the kept pair with the longest history."""
        if wanted is None:
            # The method at work on what the run delivered: the most improved kept
            # pair; a rejection only when nothing was kept.
            ranked = sorted([(True, len(e["history"]), e["example_id"], e)
                             for e in self.examples]
                            + [(False, len(r["history"]), r["candidate_id"], r)
                               for r in self.rejected], key=lambda t: t[:3])
            if not ranked:
                raise ConfigurationError(f"{self.run_dir}: the run kept and rejected "
                                         "nothing")
            kept, _, _, record = ranked[-1]
            return record, kept
        found = [(e, True) for e in self.examples if e["example_id"].startswith(wanted)]
        found += [(r, False) for r in self.rejected
                  if r["candidate_id"].startswith(wanted)]
        ids = {(r.get("example_id") or r.get("candidate_id")) for r, _ in found}
        if not found:
            raise ConfigurationError(f"{self.run_dir}: no kept pair or rejection has "
                                     f"an id starting with {wanted!r}")
        if len(ids) > 1:
            raise ConfigurationError(f"{wanted!r} names {len(ids)} records: "
                                     f"{', '.join(sorted(ids)[:8])}")
        return found[0]

    def by_id(self, record_id: str) -> Optional[tuple[dict, bool]]:
        """(the record, whether it was kept) with exactly this id, or None."""
        for example in self.examples:
            if example["example_id"] == record_id:
                return example, True
        for rejection in self.rejected:
            if rejection["candidate_id"] == record_id:
                return rejection, False
        return None

    def seeds_of(self, metadata_id: str) -> list[tuple[str, Optional[Seed]]]:
        """The seeds whose encoded metadata is this entry: (seed id, the seed read back
        from the seed file, when it is still there)."""
        seed_ids = sorted({m["seed_id"] for m in self.seed_metadata
                           if m["metadata_id"] == metadata_id and m.get("seed_id")})
        entry = self.pool.get(metadata_id, {})
        if entry.get("seed_id") and entry["seed_id"] not in seed_ids:
            seed_ids.append(entry["seed_id"])
        seeds = self._seeds(set(seed_ids))
        return [(seed_id, seeds.get(seed_id)) for seed_id in seed_ids]

    def _seeds(self, wanted: set[str]) -> dict[str, Seed]:
        options = self.manifest.get("options", {})
        pattern = options.get("seeds")
        found: dict[str, Seed] = {}
        if not pattern or not wanted:
            return found
        try:
            paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        except Exception:
            return found
        for path in paths:
            with FileSystems.open(path) as handle:
                for source, row in iter_rows(path, handle):
                    try:
                        if isinstance(row, RowError):
                            continue
                        # The seed exactly as the run read it (same id).
                        seed = make_seed(source, row, options.get("instruction_field"),
                                         options.get("max_seed_chars", DEFAULT_MAX_CHARS))
                    except RowError:
                        continue
                    if seed.seed_id in wanted:
                        found.setdefault(seed.seed_id, seed)
        return found


def _block(text: Optional[str], indent: str = "      ") -> str:
    if text is None:
        return f"{indent}(none)"
    return "\n".join(textwrap.fill(line, 96, initial_indent=indent,
                                   subsequent_indent=indent) or indent
                     for line in str(text).splitlines() or [""])


def _scores(record: dict) -> list[str]:
    orders = record.get("judge_orders") or []
    lines = []
    if len(orders) == 4:
        lines += [f"    strong answer shown first:  strong {orders[0]:g}, "
                  f"target {orders[1]:g}",
                  f"    target answer shown first:  strong {orders[2]:g}, "
                  f"target {orders[3]:g}"]
    if record.get("strong_score") is not None:
        lines.append(f"    means: strong {record['strong_score']:g}, target "
                     f"{record['target_score']:g}; gap {record['gap']:+g}")
    return lines or ["    (not judged)"]


VERDICTS = {
    "within_threshold": "rejected: the gap stayed within the threshold after the last "
                        "round",
    "not_needed": "rejected: not needed (enough pairs were in reach without it)",
    "surplus": "rejected: surplus (kept, but beyond --num_examples)",
}


def trace(run: Run, record: dict, kept: bool) -> str:
    options = run.manifest.get("options", {})
    threshold = float(options.get("threshold", 3.0))
    models = run.manifest.get("models", {})
    record_id = record.get("example_id") or record.get("candidate_id")
    lines = [f"{'kept pair' if kept else 'rejected candidate'} {record_id} "
             f"(run {run.manifest.get('run_id', '?')}, {run.run_dir})", ""]

    metadata_id = record["metadata_id"]
    lines.append("1. seed(s) and the metadata encoded from them")
    seeds = run.seeds_of(metadata_id)
    for seed_id, seed in seeds:
        where = f" ({seed.source})" if seed and seed.source else ""
        lines.append(f"   seed {seed_id}{where}:")
        lines.append(_block(seed.instruction if seed else "(not in the seed file now)"))
    if not seeds:
        origin = run.pool.get(metadata_id, {}).get("origin", "?")
        lines.append(f"   no seed: the entry's origin is {origin!r}")
    entry = run.pool.get(metadata_id, {"use_case": record["use_case"],
                                       "skills": record["skills"], "origin": "?"})
    lines += ["", f"2. pool entry {metadata_id} (origin: {entry.get('origin')})",
              f"   use case: {entry['use_case']}",
              f"   skills: {', '.join(entry['skills'])}", "",
              "3. its rubrics and actions (Self-Rubrics)"]
    rubric_set = run.rubrics.get(metadata_id)
    if rubric_set:
        for number, (rubric, action) in enumerate(
                zip(rubric_set["rubrics"], rubric_set["actions"]), start=1):
            lines.append(f"   {number}. rubric: {rubric}")
            lines.append(f"      action: {action}")
    else:
        lines.append("   (none: its rubrics call failed; see dead_letter/)")

    lines += ["", "4. the instruction, version by version"]
    versions = [*record["history"], record["instruction"]]
    for number, text in enumerate(versions, start=1):
        lines.append(f"   v{number}{' (decoded)' if number == 1 else ''}:")
        lines.append(_block(text))
        if number < len(versions):
            action = record["actions_applied"][number - 1]
            lines.append(f"      ↓ improved by the action: {action}")

    screened = not kept and record["reason"] in (DUPLICATE, CONTAMINATED)
    if screened and record.get("strong_score") is None:
        return "\n".join(lines + [""] + _screened(run, record, 5))
    if kept:
        strong = record["response"] if record["response_source"] == "strong" \
            else record.get("other_response")
        target = record["response"] if record["response_source"] == "target" \
            else record.get("other_response")
    else:
        strong, target = record.get("strong_answer"), record.get("target_answer")
    lines += ["", f"5. answers to v{len(versions)}",
              f"   strong ({models.get('strong', '?')}):", _block(strong),
              f"   target ({models.get('target', '?')}):", _block(target), "",
              f"6. judge ({models.get('judge', '?')}), scores 1-"
              f"{options.get('score_scale', 10)}", *_scores(record), ""]

    gap = record.get("gap")
    if kept and gap is not None and abs(gap) > threshold:
        verdict = (f"kept by the gap rule: |{gap:+g}| > threshold {threshold:g}, with "
                   f"the {record['response_source']} answer")
    elif kept:
        verdict = (f"kept unresolved (--keep_unresolved): |gap| <= threshold "
                   f"{threshold:g} after the last round; the better answer "
                   f"({record['response_source']}) is kept")
    elif screened:
        return "\n".join(lines + _screened(run, record, 7))
    else:
        verdict = VERDICTS.get(record["reason"], f"rejected: {record['reason']}")
    lines.append(f"7. verdict: {verdict}")
    return "\n".join(lines)


def _contamination(record: dict) -> str:
    """How the rule that matched reads, up to the benchmark row it names."""
    rule, similarity = record.get("contamination_rule") or "", record.get("similarity")
    if rule == "same_text":
        return "is the same text as"
    if rule == "share_of_3_grams":
        return f"holds {similarity:.0%} of the word 3-grams of"
    if rule == "near":
        return f"has nearly the same words (Jaccard {similarity:g}) as"
    return "shares a word n-gram with"


def _screened(run: Run, record: dict, number: int) -> list[str]:
    """Why a screen removed a candidate before it was judged (or a kept pair after),
    and what it matched."""
    paid = record.get("strong_score") is not None
    when = "after it was judged and kept (the final pairs' screen)" if paid else \
        "before any answer or judgement was paid for"
    if record["reason"] == CONTAMINATED:
        return [f"{number}. verdict: rejected {when}: contaminated. Its "
                f"{record.get('overlap_field') or 'instruction'} {_contamination(record)} "
                f"the benchmark row {record.get('benchmark_row')}; in common:",
                _block(record.get("overlap")),
                "   the row (normalised):",
                _block(record.get("matched_text") or "(not recorded by this run)")]
    # The text it was compared with, as it read then: the id it names may since have
    # been improved into another text (an improved candidate keeps its id).
    original_id = record.get("duplicate_of")
    return [f"{number}. verdict: rejected {when}: a duplicate (Jaccard similarity "
            f"{record.get('similarity', 1.0):g}) of {original_id}, which read (normalised)",
            _block(record.get("matched_text") or "(not recorded by this run)"),
            f"   to trace it: codeclm-beam show {run.run_dir} {original_id}"]


def show_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam show", description=__doc__)
    parser.add_argument("run_dir", help="A generate run's --output_dir (local or gs://).")
    parser.add_argument("id", nargs="?", default=None,
                        help="An example or candidate id, or a unique prefix of one.")
    args = parser.parse_args(argv)
    run = Run(args.run_dir)
    record, kept = run.find(args.id)
    print(trace(run, record, kept))
    return 0
