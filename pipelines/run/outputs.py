"""Writing a run's outputs through Beam filesystems (local or gs://), into the run's
own folder (`pipelines/run/commit.py` makes it current):

    RUN_DIR/examples/examples-*.jsonl, examples-*.avro
    RUN_DIR/rejected/rejected-*.jsonl
    RUN_DIR/dead_letter/dead_letter-*.jsonl
    RUN_DIR/seed_metadata/seed_metadata-*.jsonl
    RUN_DIR/metadata_pool/metadata_pool-*.jsonl
    RUN_DIR/rubrics/rubrics-*.jsonl
    RUN_DIR/export/{vertex,openai}-*.jsonl, alpaca.json   (with --export_format)
    RUN_DIR/manifest.json
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from codeclm_beam import metrics

from codeclm_beam.pipelines.run.commit import read_json  # noqa: F401 (re-exported)
from codeclm_beam.pipelines.run.commit import write_whole as write_text
from codeclm_beam.records import avro_schema
from codeclm_beam.records import to_dict
from codeclm_beam.tuning import supervised_row

EXPORT_FORMATS = ("vertex", "openai", "alpaca")
_LOG = logging.getLogger(__name__)


def to_json_line(record) -> str:
    return json.dumps(to_dict(record), ensure_ascii=False)


def to_ascii_json_line(record) -> str:
    """For dead letters, which quote what could not be read: never fails to write."""
    return json.dumps(to_dict(record), ensure_ascii=True)


class WriteJsonl(beam.PTransform):
    def __init__(self, output_dir: str, name: str, to_line=to_json_line):
        super().__init__()
        self._prefix = FileSystems.join(output_dir, name, name)
        self._to_line = to_line

    def expand(self, records):
        return (records
                | "ToJson" >> beam.Map(self._to_line)
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
    """Vertex AI Gemini supervised-tuning JSONL (`codeclm-beam tune` writes the same)."""
    return json.dumps(supervised_row(example.instruction, example.response),
                      ensure_ascii=False)


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
        metrics.dead_letter_counter(dead_letter.stage).inc()
        yield dead_letter


class WriteDeadLetters(beam.PTransform):
    """Every stage's dead letters into one folder, counted by stage for the manifest's
    accounting: the consumer of the pipeline's ErrorHandler."""

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, dead_letters):
        return (dead_letters
                | "CountByStage" >> beam.ParDo(_CountDeadLetters())
                | "Write" >> WriteJsonl(self._output_dir, "dead_letter",
                                        to_ascii_json_line))


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str),
               "application/json")


def read_jsonl_dir(directory: str) -> list[dict]:
    """Every row of the shards a run wrote in `directory` (NAME/NAME-*.jsonl): never a
    file of the user's that stands beside them."""
    name = directory.rstrip("/").rsplit("/", 1)[-1]
    pattern = FileSystems.join(directory, f"{name}-*.jsonl")
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows.extend(json.loads(line) for line in f.read().decode("utf-8").splitlines()
                        if line.strip())
    return rows
