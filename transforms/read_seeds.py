"""Reading seeds (instructions) and user-supplied metadata from files.

Any format and Beam filesystem `codeclm_beam.rows` reads (`.gz`/`.bz2` are
decompressed by extension). Each row's instruction is found by its layout
(`rows.LAYOUTS`: Alpaca, Self-Instruct, Evol-Instruct, Vicuna, Koala, chat
conversations...) without being told, and `instruction_field` (a dotted path, e.g.
`data.turns.0`) overrides the search. Empty, non-text, oversized and undecodable rows
go to the dead letter with the reason; exact duplicates are dropped and counted.
"""
from __future__ import annotations

from typing import Any, Optional

import apache_beam as beam
from apache_beam.io import fileio
from codeclm_beam import metrics

from codeclm_beam.records import Seed
from codeclm_beam.records import make_metadata
from codeclm_beam.rows import RowError
from codeclm_beam.rows import find_instruction
from codeclm_beam.records import invalid_text_reason
from codeclm_beam.stage import DEAD_LETTER
from codeclm_beam.transforms.read_rows import ParseRows
from codeclm_beam.stage import DeadLettering

STAGE = "read_seeds"
METADATA_STAGE = "read_metadata"
DEFAULT_MAX_CHARS = 20_000


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
    invalid = invalid_text_reason(text)
    if invalid:
        raise RowError(f"instruction is {invalid}")
    return Seed.of(text, source)


def _row_order(record) -> tuple:
    """Rows in file order ("f.jsonl:10" after "f.jsonl:9"), so "first" is stable."""
    path, _, number = (getattr(record, "source", "") or "").rpartition(":")
    return (path, int(number) if number.isdigit() else 0, repr(record))


class KeepFirstCountRest(beam.DoFn):
    """(key, records) -> the first record in file order; the rest counted as the
    stage's duplicates."""

    def __init__(self, stage: str):
        self._duplicates = metrics.flow_counter(metrics.duplicates(stage))

    def process(self, keyed):
        _, records = keyed
        records = sorted(records, key=_row_order)
        if len(records) > 1:
            self._duplicates.inc(len(records) - 1)
        yield records[0]


def _read(reader: DeadLettering, pcoll, file_pattern: str, stage: str, make, key
          ) -> beam.PCollection:
    parsed = (pcoll
              | "Match" >> fileio.MatchFiles(file_pattern)
              | "Open" >> fileio.ReadMatches()
              | "Parse" >> beam.ParDo(ParseRows(stage, lambda path: make)).with_outputs(
                  DEAD_LETTER, main="main"))
    unique = (parsed.main
              | "KeyByContent" >> beam.Map(lambda r: (key(r), r))
              | "GroupDuplicates" >> beam.GroupByKey()
              | "DropDuplicates" >> beam.ParDo(KeepFirstCountRest(stage)))
    reader.dead_letters(parsed[DEAD_LETTER])
    return unique


class ReadSeeds(DeadLettering):
    """file pattern -> PCollection[Seed]; unreadable rows are dead letters."""

    def __init__(self, file_pattern: str, instruction_field: Optional[str] = None,
                 max_chars: int = DEFAULT_MAX_CHARS):
        super().__init__()
        self._pattern = file_pattern
        self._field = instruction_field
        self._max_chars = max_chars

    def expand(self, pbegin) -> beam.PCollection:
        field, max_chars = self._field, self._max_chars
        return _read(self, pbegin, self._pattern, STAGE,
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


class ReadMetadata(DeadLettering):
    """file pattern of (use_case, skills) rows -> PCollection[Metadata]: the method's
    scenario 2, metadata without seeds."""

    def __init__(self, file_pattern: str, max_skills: int = 3):
        super().__init__()
        self._pattern = file_pattern
        self._max_skills = max_skills

    def expand(self, pbegin) -> beam.PCollection:
        max_skills = self._max_skills
        return _read(self, pbegin, self._pattern, METADATA_STAGE,
                     lambda source, row: make_user_metadata(source, row, max_skills),
                     key=lambda m: m.metadata_id)
