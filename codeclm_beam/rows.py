"""Rows of instruction files, and where each known layout keeps the instruction.

One reader for seeds, user metadata, benchmarks and `codeclm-beam split`: JSONL, JSON
arrays, CSV/TSV, Parquet and Avro from any Beam filesystem, and one table of layouts
(`LAYOUTS`, first match wins) that says which field holds the instruction, the item's
id and its category:

    self-instruct  instruction + instances[0].input     id, motivation_app
    alpaca         instruction (+ input)
    evol-instruct  Instruction                          idx, Skill
    vicuna         turns (first)                        question_id, category
    vicuna-old     text, with question_id               question_id, category
    koala          prompt                               id
    text / question
    chat           messages / conversations (first user turn)

`instruction_field` (a dotted path, e.g. `data.turns.0`) overrides the table.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterator, Optional

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "avro")


class RowError(ValueError):
    """A row that cannot become a record; the message is the reason."""


def format_of(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".deflate"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    ext = os.path.splitext(name)[1].lstrip(".")
    return {"ndjson": "jsonl", "jl": "jsonl", "txt": "jsonl"}.get(ext, ext)


def iter_rows(path: str, handle) -> Iterator[tuple[str, Any]]:
    """(row source "path:number", row or RowError) for every row of an open binary
    file; RowError for the file itself when its format is unknown or it is not text."""
    fmt = format_of(path)
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
            yield from jsonl_rows(path, io.BytesIO(data))
            return
        rows = value if isinstance(value, list) else [value]
        for number, row in enumerate(rows, start=1):
            yield f"{path}:{number}", row
    else:
        yield from jsonl_rows(path, handle)


def jsonl_rows(path: str, handle) -> Iterator[tuple[str, Any]]:
    """(source, row or RowError) per non-blank line of a JSON Lines file. `handle`
    may be Beam's CompressedFile (a .gz or .bz2 file opened by FileSystems), which
    reads lines but is not iterable."""
    lines = handle if hasattr(handle, "__iter__") else iter(handle.readline, b"")
    for number, raw in enumerate(lines, start=1):
        source = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            # utf-8-sig: a byte-order mark before the first row (Windows editors
            # write one) is not part of it, as for CSV and JSON.
            yield source, json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            yield source, RowError(f"line is not valid UTF-8: {e}")
        except RecursionError:
            yield source, RowError("line is nested too deeply to parse")
        except ValueError as e:
            yield source, RowError(f"line is not valid JSON: {e}")


def lookup(row: Any, dotted: str) -> Any:
    """The value at a dotted path ("data.turns.0"); RowError when it is not there."""
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


def _first_turn(turns: Any) -> Any:
    if not isinstance(turns, list) or not turns:
        raise RowError("'turns' is empty or not a list")
    first = turns[0]
    return first.get("content") if isinstance(first, dict) else first


def _first_user_turn(turns: Any) -> Any:
    if not isinstance(turns, list):
        return turns
    for turn in turns:
        if isinstance(turn, dict):
            role = str(turn.get("role", turn.get("from", ""))).lower()
            if role in ("user", "human"):
                return turn.get("content", turn.get("value"))
    raise RowError("no user turn in the conversation")


def _with_input(row: dict, instruction: Any) -> Any:
    """An instruction with its input (Alpaca's `input`, or Self-Instruct's first
    instance's), appended as "Input: ..."."""
    extra = row.get("input")
    instances = row.get("instances")
    if not extra and isinstance(instances, list) and instances and \
            isinstance(instances[0], dict):
        extra = instances[0].get("input")
    if extra and isinstance(extra, str) and extra.strip() and isinstance(instruction, str):
        return f"{instruction}\n\nInput: {extra}"
    return instruction


_READ = {"text": lambda row, value: value, "with_input": _with_input,
         "first_turn": lambda row, value: _first_turn(value),
         "first_user_turn": lambda row, value: _first_user_turn(value)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a layout keeps a row's instruction, id and category."""

    name: str
    # The field holding the instruction (or the conversation's turns); a dotted path
    # for a layout named by the user.
    field: str
    id_field: Optional[str] = None
    category_field: Optional[str] = None
    # Other fields a row must have to be of this layout.
    requires: tuple[str, ...] = ()
    # How the instruction is read from the field: a key of _READ.
    read: str = "text"

    def matches(self, row: dict) -> bool:
        return all(name in row for name in (self.field, *self.requires))

    def instruction(self, row: Any) -> Any:
        """The row's instruction (not yet checked to be text); RowError when the row
        lacks it."""
        if not isinstance(row, dict):
            raise RowError(f"row is a {type(row).__name__}, not an object with fields")
        if self.name == BY_FIELD:
            return lookup(row, self.field)
        if self.field not in row:
            raise RowError(f"no '{self.field}' field, where the {self.name} layout keeps "
                           f"the instruction; fields found: {sorted(map(str, row))[:20]}")
        return _READ[self.read](row, row[self.field])


BY_FIELD = "jsonl"

LAYOUTS = (
    Layout("self-instruct", "instruction", "id", "motivation_app",
           requires=("instances",), read="with_input"),
    Layout("alpaca", "instruction", read="with_input"),
    Layout("evol-instruct", "Instruction", "idx", "Skill"),
    Layout("vicuna", "turns", "question_id", "category", read="first_turn"),
    Layout("vicuna-old", "text", "question_id", "category", requires=("question_id",)),
    Layout("koala", "prompt", "id"),
    Layout("text", "text"),
    Layout("question", "question"),
    Layout("chat", "messages", read="first_user_turn"),
    Layout("sharegpt", "conversations", read="first_user_turn"),
)


def by_field(dotted: str) -> Layout:
    """The layout of rows whose instruction is at a path the user named."""
    return Layout(BY_FIELD, dotted, "id", "category")


def detect_layout(row: Any, instruction_field: Optional[str] = None) -> Optional[Layout]:
    if instruction_field:
        return by_field(instruction_field)
    if not isinstance(row, dict):
        return None
    return next((layout for layout in LAYOUTS if layout.matches(row)), None)


def find_instruction(row: Any, instruction_field: Optional[str] = None,
                     flag: str = "--instruction_field") -> Any:
    """A row's instruction by its own layout (rows of one file may differ)."""
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, not an object with fields")
    layout = detect_layout(row, instruction_field)
    if layout is None:
        fields = ", ".join(dict.fromkeys(layout.field for layout in LAYOUTS))
        raise RowError(f"no instruction field (looked for {fields}) in fields "
                       f"{sorted(map(str, row))[:20]}; pass {flag}")
    return layout.instruction(row)
