"""The kept pairs as a Hugging Face dataset, in the formats TRL's trainers take, written
by the pipeline's own Parquet sinks (so a Dataflow run writes them as a local one does):

    RUN_DIR/data/sft/{train,validation}-SSSSS-of-NNNNN.parquet
        example_id, messages                       (TRL SFTTrainer, conversational)
    RUN_DIR/data/preference/{train,validation}-...parquet
        example_id, prompt, chosen, rejected,      (TRL DPOTrainer, conversational)
        score_chosen, score_rejected, gap, chosen_source
    RUN_DIR/data/examples/{train,validation}-...parquet
        the rows of examples/, every field
    RUN_DIR/README.md                              the card; its `configs:` YAML names
                                                   each configuration's files

The validation split is the one `codeclm-beam tune` makes (`tuning.validation_bucket`),
so a pair is in the same split wherever it is trained. A pair whose two answers the
judge scored the same prefers neither: it is left out of `preference` and counted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from codeclm_beam.records import Example
from codeclm_beam.records import avro_schema
from codeclm_beam.records import to_dict
from codeclm_beam.tuning import validation_bucket

DATA_FOLDER = "data"
CARD = "README.md"
TRAIN, VALIDATION = "train", "validation"


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def sft_row(example: Example) -> dict:
    return {"example_id": example.example_id,
            "messages": [_turn("user", example.instruction),
                         _turn("assistant", example.response)]}


def preference_row(example: Example) -> Optional[dict]:
    """The pair as a preference, the answer the judge scored higher chosen; None when
    the scores are even or the other answer is missing."""
    answers = {example.response_source: example.response,
               ("target" if example.response_source == "strong" else "strong"):
                   example.other_response}
    if not answers["strong"] or not answers["target"] or \
            example.strong_score == example.target_score:
        return None
    chosen = "strong" if example.strong_score > example.target_score else "target"
    rejected = "target" if chosen == "strong" else "strong"
    scores = {"strong": example.strong_score, "target": example.target_score}
    return {"example_id": example.example_id,
            "prompt": [_turn("user", example.instruction)],
            "chosen": [_turn("assistant", answers[chosen])],
            "rejected": [_turn("assistant", answers[rejected])],
            "score_chosen": float(scores[chosen]),
            "score_rejected": float(scores[rejected]),
            "gap": abs(float(scores[chosen]) - float(scores[rejected])),
            "chosen_source": chosen}


def _messages_type():
    import pyarrow as pa
    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _sft_schema():
    import pyarrow as pa
    return pa.schema([("example_id", pa.string()), ("messages", _messages_type())])


def _preference_schema():
    import pyarrow as pa
    messages = _messages_type()
    return pa.schema([("example_id", pa.string()), ("prompt", messages),
                      ("chosen", messages), ("rejected", messages),
                      ("score_chosen", pa.float64()), ("score_rejected", pa.float64()),
                      ("gap", pa.float64()), ("chosen_source", pa.string())])


def _examples_schema():
    return _arrow_schema(avro_schema(Example))


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One configuration of the dataset: its rows and their Parquet schema."""
    name: str
    rows: Any  # Example -> row dict, or None when the pair has no such row
    schema: Any  # () -> pyarrow.Schema (pyarrow imported when a pipeline is built)
    describes: str


CONFIGURATIONS = (
    Configuration("sft", sft_row, _sft_schema, "a `messages` column (user, assistant): "
                  "TRL's SFTTrainer takes it as it is"),
    Configuration("preference", preference_row, _preference_schema, "`prompt`, "
                  "`chosen`, `rejected` as messages, the judge's scores and gap: TRL's "
                  "DPOTrainer takes it as it is"),
    Configuration("examples", to_dict, _examples_schema, "the kept pairs with every "
                  "field of `examples/`: chain of instructions, both scores, models"),
)
DEFAULT_CONFIGURATION = "sft"


def _arrow_schema(record_schema: dict):
    """The Arrow schema of an Avro record schema of `records.avro_schema`."""
    import pyarrow as pa
    primitive = {"string": pa.string(), "long": pa.int64(), "double": pa.float64(),
                 "boolean": pa.bool_()}

    def arrow(avro_type):
        if isinstance(avro_type, list):  # ["null", T]: nullable T
            return arrow(next(t for t in avro_type if t != "null"))
        if isinstance(avro_type, dict):
            return pa.list_(arrow(avro_type["items"]))
        return primitive[avro_type]
    return pa.schema([(f["name"], arrow(f["type"])) for f in record_schema["fields"]])


def rows_in(splits: dict[str, dict[str, int]], name: str) -> int:
    """Rows of configuration `name` over its splits."""
    return sum((splits.get(name) or {}).values())


def split_of(example: Example, validation_share: float) -> str:
    return VALIDATION if validation_bucket(example.instruction) < validation_share \
        else TRAIN


class WriteHubDataset(beam.PTransform):
    """Kept pairs (`Example`s) -> RUN_DIR/data/CONFIGURATION/SPLIT-*.parquet."""

    def __init__(self, output_dir: str, validation_share: float = 0.0):
        super().__init__()
        self._data = FileSystems.join(output_dir, DATA_FOLDER)
        self._validation_share = validation_share

    def expand(self, examples):
        splits = {TRAIN: examples}
        if self._validation_share > 0:
            share = self._validation_share
            train, validation = examples | "Split" >> beam.Partition(
                lambda example, _: int(split_of(example, share) == VALIDATION), 2)
            splits = {TRAIN: train, VALIDATION: validation}
        for split, pairs in splits.items():
            for configuration in CONFIGURATIONS:
                (pairs
                 | f"{configuration.name}_{split}_Rows" >> beam.FlatMap(
                     _rows_of, configuration.rows)
                 | f"{configuration.name}_{split}_Write" >> beam.io.WriteToParquet(
                     FileSystems.join(self._data, configuration.name, split),
                     configuration.schema(), file_name_suffix=".parquet"))
        return examples.pipeline


def _rows_of(example: Example, rows) -> Iterable[dict]:
    row = rows(example)
    if row is not None:
        yield row


def splits_written(run_dir: str) -> dict[str, dict[str, int]]:
    """Rows per configuration and split, read from the Parquet files' footers."""
    import pyarrow.parquet as pq
    counts: dict[str, dict[str, int]] = {}
    for configuration in CONFIGURATIONS:
        for split in (TRAIN, VALIDATION):
            pattern = FileSystems.join(run_dir, DATA_FOLDER, configuration.name,
                                       f"{split}-*.parquet")
            files = FileSystems.match([pattern])[0].metadata_list
            if not files:
                continue
            rows = 0
            for found in files:
                with FileSystems.open(found.path) as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            counts.setdefault(configuration.name, {})[split] = rows
    return counts


def configs_yaml(splits: dict[str, dict[str, int]]) -> list[dict]:
    """The card's `configs:` entries: each configuration's files by split. A split
    without rows is left out (`datasets` refuses to load one); a configuration without
    any keeps its train split, so that loading it says there is no data."""
    entries = []
    for configuration in CONFIGURATIONS:
        counts = splits.get(configuration.name) or {}
        named = [split for split in (TRAIN, VALIDATION) if counts.get(split)] or [TRAIN]
        entries.append({
            "config_name": configuration.name,
            **({"default": True} if configuration.name == DEFAULT_CONFIGURATION else {}),
            "data_files": [{"split": split,
                            "path": f"{DATA_FOLDER}/{configuration.name}/{split}-*.parquet"}
                           for split in named]})
    return entries


CITATION = """@inproceedings{wang2024codeclm,
  title={CodecLM: Aligning Language Models with Tailored Synthetic Data},
  author={Wang, Zifeng and Li, Chun-Liang and Perot, Vincent and Le, Long T. and Miao, Jin
          and Zhang, Zizhao and Lee, Chen-Yu and Pfister, Tomas},
  booktitle={Findings of the Association for Computational Linguistics: NAACL 2024},
  year={2024}
}"""


def _size_category(rows: int) -> str:
    for limit, name in ((1000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "n>1M"


def dataset_card(manifest: dict, splits: dict[str, dict[str, int]],
                 repo_id: Optional[str] = None) -> str:
    """The dataset card (README.md): YAML metadata whose `configs:` names each
    configuration's files, then what a user of the data needs to know: how to load it,
    how it was made, what was screened out, and its limits."""
    import yaml
    pairs = rows_in(splits, "sft")
    metadata = {
        "pretty_name": f"CodecLM synthetic instructions ({manifest['run_id']})",
        "language": ["en"],
        # Left for the user to set: the terms of the models that wrote the data decide
        # what it may be used for.
        "license": "other",
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "instruction-tuning", "codeclm"],
        "size_categories": [_size_category(pairs)],
        "configs": configs_yaml(splits),
    }
    return "\n".join([
        "---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(), "---",
        "", "# CodecLM synthetic instruction data", "",
        f"{pairs} instruction–response pairs generated by codeclm-beam "
        f"{manifest.get('code_version', '')}, an implementation of "
        "[CodecLM](https://arxiv.org/abs/2404.05875), tailored to the distribution of the "
        "seed instructions. The licence (`license: other` above) is yours to set: the "
        "terms of use of the models below apply to what they wrote.", "",
        _load_section(splits, repo_id), _made_section(manifest), _screens_section(manifest),
        _rounds_section(manifest), _calls_section(manifest), _tailoring_section(manifest),
        LIMITS,
        "## Citation", "", "```bibtex", CITATION, "```", ""])


def _load_section(splits: dict, repo_id: Optional[str]) -> str:
    where = repo_id or "OUTPUT_DIR"
    rows = []
    for configuration in CONFIGURATIONS:
        counts = splits.get(configuration.name) or {}
        shown = ", ".join(f"{split} {n:,}" for split, n in counts.items()) or "none"
        rows.append(f"| `{configuration.name}` | {shown} | {configuration.describes} |")
    pairs, preference = rows_in(splits, "sft"), rows_in(splits, "preference")
    return "\n".join([
        "## Load it", "", "```python", "import datasets", "",
        f'sft = datasets.load_dataset("{where}", "sft")',
        f'preference = datasets.load_dataset("{where}", "preference")',
        f'examples = datasets.load_dataset("{where}", "examples")', "```", "",
        "| configuration | rows by split | what it holds |", "|---|---|---|", *rows, "",
        f"{pairs - preference} of the {pairs} pairs are not in `preference`: the judge "
        "scored their two answers the same (kept by `--keep_unresolved`), so neither "
        "is preferred. The validation split, when there is one, holds the pairs "
        "`codeclm-beam tune` holds out at the same `--validation_share`.", ""])


def _made_section(manifest: dict) -> str:
    options, acc = manifest["options"], manifest["accounting"]
    models, candidates = manifest["models"], acc["candidates"]
    return f"""## How it was made

- Strong model (codec, answers, rubrics, improvements): `{models['strong']}`
- Target model: `{models['target']}`
- Judge: `{models['judge']}`
- Metadata pool: {acc['metadata_pool']['entries']} entries; {options.get('num_rubrics')}
  rubrics each; up to {options.get('max_iterations')} iterations; threshold
  {options.get('threshold')} on a {options.get('score_scale')}-point scale; seed
  {options.get('seed')}.
- Candidates: {candidates['basic_instructions']} basic instructions;
  {candidates['kept']} kept by the gap rule,
  {candidates['unresolved_after_last_round']} still within the threshold after
  the last round ({'kept anyway' if options.get('keep_unresolved') else 'rejected'}),
  {candidates['lost_to_dead_letters']} lost to errors (see `dead_letter/`).
"""


def _screens_section(manifest: dict) -> str:
    """Deduplication and decontamination: the rules and what they removed."""
    screens = manifest.get("screens") or {}
    screening = manifest["accounting"].get("screening")
    if not screening:
        return ""
    lines = ["## Deduplication and decontamination", ""]
    dedup, decon = screens.get("dedup"), screens.get("decontamination")
    dups, dirty = screening["duplicates"], screening["contaminated"]
    lines.append(f"- Duplicates: {dedup}; {dups['before_judging']} candidates removed "
                 f"before they were judged, {dups['final_pairs']} from the final pairs."
                 if dedup else "- Duplicates: not removed (`--no_dedup`).")
    if decon:
        checked = "instructions and answers" if decon["answers_checked"] else "instructions"
        lines.append(f"- Contamination: {decon['rule']}, {checked} checked against "
                     + ", ".join(f"`{b}`" for b in decon["benchmarks"])
                     + (f" (the held-out half of the seeds' split, "
                        f"`{decon['held_out_of_split']}`, picked up by itself)"
                        if decon.get("held_out_of_split") else "")
                     + f"; {dirty['before_judging']} candidates removed before they were "
                     f"judged, {dirty['final_pairs']} from the final pairs; "
                     f"{screening['benchmark_rows_compared_whole']} benchmark rows under "
                     "5 words compared whole.")
    else:
        lines.append("- Contamination: not checked (no `--decontaminate` file). Check "
                     "against the benchmarks you will evaluate on before training.")
    lines.append(f"- Model calls saved by removing them before judging: "
                 f"{screening['calls_saved']}.")
    return "\n".join(lines) + "\n"


def _rounds_section(manifest: dict) -> str:
    rounds = manifest["accounting"]["candidates"].get("rounds") or []
    rows = [f"| {r['round']} | {r['candidates']} | {r['kept']} | "
            f"{r['kept'] / r['candidates']:.0%} |" if r["candidates"] else
            f"| {r['round']} | 0 | {r['kept']} | - |" for r in rounds]
    return "\n".join(["## Kept share by round", "",
                      "| round | candidates judged | kept by the gap rule | kept share |",
                      "|---|---|---|---|", *rows, ""])


def _calls_section(manifest: dict) -> str:
    """Model requests by stage, summed over the stage's models."""
    stages = (manifest.get("model_calls") or {}).get("by_stage") or {}
    rows = [f"| {stage} | {sum(int(n.get('requests', 0)) for n in entry['models'].values())} |"
            for stage, entry in stages.items()]
    return "\n".join(["## Model requests by stage", "", "| stage | requests |",
                      "|---|---|", *rows, ""])


def _tailoring_section(manifest: dict) -> str:
    tailor = manifest.get("tailoring") or {}
    return f"""## Tailoring

Jensen–Shannon divergence between the use cases of the seeds and of the kept examples:
{tailor.get('use_case_js_divergence')} bits (0 = identical). Share of the seeds' skills
found among the kept examples: {tailor.get('seed_skill_coverage')}.
"""


LIMITS = """## Fields of `examples`

`instruction`, `response`, `response_source` (strong or target), `iteration`,
`use_case`, `skills`, `actions_applied`, `strong_score`, `target_score`, `gap`,
`strong_model`, `target_model`, `judge_model`, `other_response`.

## Limitations

Synthetic data inherits the strong model's errors, biases and blind spots, and the
judge's: an LLM judge prefers long and confident answers and can be wrong. The data is
tailored to the seed instructions; it is no better than they are at representing your
users. Check a sample by hand before training, and evaluate the tuned model on held-out
instructions (`codeclm-beam evaluate`). Respect the terms of use of the models that
produced it.
"""


def write_card(outputs, manifest: dict) -> dict[str, Any]:
    """Writes the card into the run's folder (`outputs`: the run's `OutputFolder`);
    returns the manifest's `dataset` entry: rows per configuration and split."""
    splits = splits_written(outputs.run_dir)
    outputs.write_text(CARD, dataset_card(manifest, splits), "text/markdown")
    return {"configurations": splits, "card": CARD,
            "preference_left_out_even": rows_in(splits, "sft") - rows_in(splits,
                                                                         "preference")}

