"""Writing a run's outputs, and its manifest, through Beam filesystems (local or gs://).

    OUTPUT_DIR/examples/examples-*.jsonl, examples-*.avro
    OUTPUT_DIR/rejected/rejected-*.jsonl
    OUTPUT_DIR/dead_letter/dead_letter-*.jsonl
    OUTPUT_DIR/seed_metadata/seed_metadata-*.jsonl
    OUTPUT_DIR/metadata_pool/metadata_pool-*.jsonl
    OUTPUT_DIR/rubrics/rubrics-*.jsonl
    OUTPUT_DIR/export/{vertex,openai}-*.jsonl, alpaca.json   (with --export_format)
    OUTPUT_DIR/manifest.json
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from codeclm_beam.records import avro_schema
from codeclm_beam.records import to_dict

EXPORT_FORMATS = ("vertex", "openai", "alpaca")


def to_json_line(record) -> str:
    return json.dumps(to_dict(record), ensure_ascii=False)


class WriteJsonl(beam.PTransform):
    def __init__(self, output_dir: str, name: str):
        super().__init__()
        self._prefix = FileSystems.join(output_dir, name, name)

    def expand(self, records):
        return (records
                | "ToJson" >> beam.Map(to_json_line)
                | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))


class WriteAvro(beam.PTransform):
    def __init__(self, output_dir: str, name: str, record_type: type):
        super().__init__()
        self._prefix = FileSystems.join(output_dir, name, name)
        self._schema = avro_schema(record_type)

    def expand(self, records):
        return (records
                | "ToDict" >> beam.Map(to_dict)
                | "Write" >> beam.io.WriteToAvro(self._prefix, schema=self._schema,
                                                 file_name_suffix=".avro"))


def vertex_tuning_row(example) -> str:
    """Vertex AI Gemini supervised-tuning JSONL."""
    return json.dumps({"contents": [
        {"role": "user", "parts": [{"text": example.instruction}]},
        {"role": "model", "parts": [{"text": example.response}]}]}, ensure_ascii=False)


def openai_chat_row(example) -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": example.instruction},
        {"role": "assistant", "content": example.response}]}, ensure_ascii=False)


def alpaca_json(examples: list) -> str:
    rows = [{"instruction": e.instruction, "input": "", "output": e.response}
            for e in sorted(examples, key=lambda e: e.example_id)]
    return json.dumps(rows, ensure_ascii=False, indent=1)


class WriteExports(beam.PTransform):
    def __init__(self, output_dir: str, formats: Iterable[str]):
        super().__init__()
        self._dir = FileSystems.join(output_dir, "export")
        self._formats = tuple(formats)
        unknown = set(self._formats) - set(EXPORT_FORMATS)
        if unknown:
            raise ValueError(f"unknown export format(s) {sorted(unknown)}; "
                             f"choose from {', '.join(EXPORT_FORMATS)}")

    def expand(self, examples):
        for fmt in self._formats:
            if fmt == "alpaca":
                # One JSON array: collected in one place, which suits fine-tuning sets
                # (thousands of pairs); use the JSONL exports for millions.
                (examples
                 | "AlpacaCollect" >> beam.combiners.ToList()
                 | "AlpacaJson" >> beam.Map(alpaca_json)
                 | "AlpacaWrite" >> beam.io.WriteToText(
                     FileSystems.join(self._dir, "alpaca"), file_name_suffix=".json",
                     num_shards=1, shard_name_template=""))
            else:
                row = vertex_tuning_row if fmt == "vertex" else openai_chat_row
                (examples
                 | f"{fmt}Rows" >> beam.Map(row)
                 | f"{fmt}Write" >> beam.io.WriteToText(
                     FileSystems.join(self._dir, fmt), file_name_suffix=".jsonl"))
        return examples.pipeline


class _CountDeadLetters(beam.DoFn):
    def process(self, dead_letter):
        Metrics.counter("codeclm/dead_letter", dead_letter.stage).inc()
        yield dead_letter


class WriteDeadLetters(beam.PTransform):
    """Every stage's dead letters, as a tuple of PCollections, into one folder, counted
    by stage for the manifest's accounting."""

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, dead_letters):
        return (dead_letters
                | "All" >> beam.Flatten()
                | "CountByStage" >> beam.ParDo(_CountDeadLetters())
                | "Write" >> WriteJsonl(self._output_dir, "dead_letter"))


def write_text(path: str, text: str, mime_type: str = "text/plain") -> None:
    with FileSystems.create(path, mime_type=mime_type) as f:
        f.write(text.encode("utf-8"))


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str),
               "application/json")


def read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def read_jsonl_dir(directory: str) -> list[dict]:
    """Every row of every *.jsonl file a sharded write left in `directory`."""
    rows = []
    for match in FileSystems.match([FileSystems.join(directory, "*.jsonl")])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows.extend(json.loads(line) for line in f.read().decode("utf-8").splitlines()
                        if line.strip())
    return rows


def clear_outputs(output_dir: str, names: Iterable[str]) -> None:
    """Deletes the files an earlier run left in these output folders (never the cache),
    so a re-run into the same --output_dir cannot mix its shards with stale ones."""
    for name in names:
        pattern = FileSystems.join(output_dir, name, "*")
        stale = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        if stale:
            FileSystems.delete(stale)
