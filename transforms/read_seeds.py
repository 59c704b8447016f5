"""Reading seeds (instructions) and user-supplied metadata from files.

JSONL, JSON arrays, CSV/TSV, Parquet and Avro, local or `gs://` (through Beam's
`fileio`, so any Beam filesystem works; `.gz`/`.bz2` are decompressed by extension).
The instruction is found in the common layouts without being told:

    instruction (+ input, or instances[0].input, appended as "Input: ..."), prompt,
    text, question, Instruction, turns (first item), messages / conversations (first
    user turn)

and `instruction_field` (a dotted path, e.g. `data.turns.0`) overrides the search.
Empty, non-text, oversized and undecodable rows go to the dead letter with the reason;
exact duplicates are dropped and counted.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from codeclm_beam.records import DeadLetter
from codeclm_beam.records import Seed
from codeclm_beam.records import invalid_text_reason
from codeclm_beam.stage import DEAD_LETTER
from codeclm_beam.stage import StageOutput
from codeclm_beam.transforms.encode import make_metadata

STAGE = "read_seeds"
METADATA_STAGE = "read_metadata"
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "avro")
DEFAULT_MAX_CHARS = 20_000


class RowError(ValueError):
    """A row that cannot become a seed; the message is the reason."""


def _format_of(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".deflate"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    ext = os.path.splitext(name)[1].lstrip(".")
    return {"ndjson": "jsonl", "jl": "jsonl", "txt": "jsonl"}.get(ext, ext)


def iter_rows(path: str, handle) -> Iterator[tuple[str, Any]]:
    """(row source, row or RowError) for every row of an open binary file."""
    fmt = _format_of(path)
    if fmt not in FORMATS:
        raise RowError(f"unknown file format '.{fmt}' (known: {', '.join(FORMATS)})")
    if fmt == "parquet":
        import pyarrow.parquet as pq
        number = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:{number}", row
    elif fmt == "avro":
        import fastavro
        for number, row in enumerate(fastavro.reader(handle), start=1):
            yield f"{path}:{number}", row
    elif fmt in ("csv", "tsv"):
        data = handle.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise RowError(f"file is not UTF-8 text: {e}") from None
        reader = csv.DictReader(io.StringIO(text, newline=""),
                                delimiter="\t" if fmt == "tsv" else ",")
        for number, row in enumerate(reader, start=1):
            yield f"{path}:{number}", row
    elif fmt == "json":
        data = handle.read()
        try:
            value = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            # Many ".json" files are JSON Lines; read them as such.
            yield from _jsonl_rows(path, io.BytesIO(data))
            return
        rows = value if isinstance(value, list) else [value]
        for number, row in enumerate(rows, start=1):
            yield f"{path}:{number}", row
    else:
        yield from _jsonl_rows(path, handle)


def _jsonl_rows(path, handle):
    for number, raw in enumerate(handle, start=1):
        source = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            yield source, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield source, RowError(f"line is not valid UTF-8: {e}")
        except RecursionError:
            yield source, RowError("line is nested too deeply to parse")
        except ValueError as e:
            yield source, RowError(f"line is not valid JSON: {e}")


def _lookup(row: Any, dotted: str) -> Any:
    value = row
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and \
                -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise RowError(f"field '{dotted}' not found")
    return value


def _first_user_turn(turns: Any) -> Any:
    if not isinstance(turns, list):
        return turns
    for turn in turns:
        if isinstance(turn, dict):
            role = str(turn.get("role", turn.get("from", ""))).lower()
            if role in ("user", "human"):
                return turn.get("content", turn.get("value"))
    raise RowError("no user turn in the conversation")


def find_instruction(row: Any, instruction_field: Optional[str] = None) -> Any:
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, not an object with fields")
    if instruction_field:
        return _lookup(row, instruction_field)
    if "instruction" in row:
        extra = row.get("input")
        instances = row.get("instances")
        if not extra and isinstance(instances, list) and instances and \
                isinstance(instances[0], dict):
            extra = instances[0].get("input")
        instruction = row["instruction"]
        if extra and isinstance(extra, str) and extra.strip() and \
                isinstance(instruction, str):
            return f"{instruction}\n\nInput: {extra}"
        return instruction
    for name in ("prompt", "text", "question", "Instruction"):
        if name in row:
            return row[name]
    if "turns" in row:
        turns = row["turns"]
        if isinstance(turns, list) and turns:
            first = turns[0]
            return first.get("content") if isinstance(first, dict) else first
        raise RowError("'turns' is empty or not a list")
    for name in ("messages", "conversations"):
        if name in row:
            return _first_user_turn(row[name])
    raise RowError("no instruction field (looked for instruction, prompt, text, "
                   f"question, Instruction, turns, messages, conversations) in fields "
                   f"{sorted(map(str, row))[:20]}; pass --instruction_field")


def make_seed(source: str, row: Any, instruction_field: Optional[str],
              max_chars: int) -> Seed:
    value = find_instruction(row, instruction_field)
    if not isinstance(value, str):
        raise RowError(f"instruction is a {type(value).__name__}, not text")
    text = value.strip()
    if not text:
        raise RowError("instruction is empty")
    if len(text) > max_chars:
        raise RowError(f"instruction has {len(text)} characters, over the limit of "
                       f"{max_chars} (--max_seed_chars)")
    if "\x00" in text:
        raise RowError("instruction contains NUL characters")
    invalid = invalid_text_reason(text)
    if invalid:
        raise RowError(f"instruction is {invalid}")
    return Seed.of(text, source)


class _ParseFile(beam.DoFn):
    """One file -> its rows, each made into a record or a dead letter."""

    def __init__(self, stage: str, make):
        self._stage = stage
        self._make = make
        self._rows = Metrics.counter("codeclm/flow", f"{stage}.rows")

    def process(self, readable: fileio.ReadableFile):
        path = readable.metadata.path
        try:
            with readable.open() as handle:
                for source, row in iter_rows(path, handle):
                    self._rows.inc()
                    try:
                        if isinstance(row, RowError):
                            raise row
                        yield self._make(source, row)
                    except Exception as e:
                        yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                            self._stage, source, e, payload=_printable(row),
                            reason="bad_input"))
        except Exception as e:  # the file itself is unreadable (or ends corrupt)
            self._rows.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                self._stage, path, e, reason="bad_input"))


def _printable(row: Any) -> Any:
    if isinstance(row, RowError):
        return None
    try:
        json.dumps(row)
        return row
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(row)[:10_000]
        except RecursionError:
            return "(row nested too deeply to show)"


def _row_order(record) -> tuple:
    """Rows in file order ("f.jsonl:10" after "f.jsonl:9"), so "first" is stable."""
    path, _, number = (getattr(record, "source", "") or "").rpartition(":")
    return (path, int(number) if number.isdigit() else 0, repr(record))


class _KeepFirstCountRest(beam.DoFn):
    def __init__(self, stage: str):
        self._duplicates = Metrics.counter("codeclm/flow", f"{stage}.duplicates")

    def process(self, keyed):
        _, records = keyed
        records = sorted(records, key=_row_order)
        if len(records) > 1:
            self._duplicates.inc(len(records) - 1)
        yield records[0]


def _read(pcoll, file_pattern: str, stage: str, make, key) -> StageOutput:
    parsed = (pcoll
              | "Match" >> fileio.MatchFiles(file_pattern)
              | "Open" >> fileio.ReadMatches()
              | "Parse" >> beam.ParDo(_ParseFile(stage, make)).with_outputs(
                  DEAD_LETTER, main="main"))
    unique = (parsed.main
              | "KeyByContent" >> beam.Map(lambda r: (key(r), r))
              | "GroupDuplicates" >> beam.GroupByKey()
              | "DropDuplicates" >> beam.ParDo(_KeepFirstCountRest(stage)))
    return StageOutput(unique, parsed[DEAD_LETTER])


class ReadSeeds(beam.PTransform):
    """file pattern -> StageOutput(PCollection[Seed], dead letters)."""

    def __init__(self, file_pattern: str, instruction_field: Optional[str] = None,
                 max_chars: int = DEFAULT_MAX_CHARS):
        super().__init__()
        self._pattern = file_pattern
        self._field = instruction_field
        self._max_chars = max_chars

    def expand(self, pbegin) -> StageOutput:
        field, max_chars = self._field, self._max_chars
        return _read(pbegin, self._pattern, STAGE,
                     lambda source, row: make_seed(source, row, field, max_chars),
                     key=lambda seed: seed.seed_id)


def make_user_metadata(source: str, row: Any, max_skills: int):
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, not an object with fields")
    use_case = next((row[k] for k in ("use_case", "use case", "usecase", "task")
                     if k in row), None)
    skills = row.get("skills")
    if not isinstance(use_case, str):
        raise RowError("no text field 'use_case'")
    for text in [use_case, *(skills if isinstance(skills, (list, tuple)) else [skills])]:
        invalid = invalid_text_reason(text) if isinstance(text, str) else None
        if invalid:
            raise RowError(f"use case or skill is {invalid}")
    if isinstance(skills, str):
        skills = [s for s in skills.replace(";", ",").split(",")]
    if not isinstance(skills, (list, tuple)) or not all(isinstance(s, str) for s in skills):
        raise RowError("'skills' must be a list of text or a comma-separated text")
    try:
        return make_metadata(use_case, skills, "user", max_skills)
    except ValueError as e:
        raise RowError(str(e)) from None


class ReadMetadata(beam.PTransform):
    """file pattern of (use_case, skills) rows -> StageOutput(PCollection[Metadata],
    dead letters): the method's scenario 2, metadata without seeds."""

    def __init__(self, file_pattern: str, max_skills: int = 3):
        super().__init__()
        self._pattern = file_pattern
        self._max_skills = max_skills

    def expand(self, pbegin) -> StageOutput:
        max_skills = self._max_skills
        return _read(pbegin, self._pattern, METADATA_STAGE,
                     lambda source, row: make_user_metadata(source, row, max_skills),
                     key=lambda m: m.metadata_id)
