"""The sinks a pipeline with codeclm stages needs, the CLI's runs and Beam YAML's
providers alike: JSON lines (`WriteJsonl`, `WriteLines`), Avro with the records'
schemas (`WriteAvro`), dead letters counted by stage (`WriteDeadLetters`, an
ErrorHandler's consumer) and fine-tuning exports (`WriteExports`). Every path goes
through Beam's filesystems, so gs:// works as a local folder does.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from codeclm_beam import metrics
from codeclm_beam.records import avro_schema
from codeclm_beam.records import to_dict
from codeclm_beam.tuning import supervised_row

EXPORT_FORMATS = ("vertex", "openai", "alpaca")
def _plain(record: Any) -> dict:
    """A record as a JSON-ready dict: a codeclm record (dataclass), a Beam Row or any
    NamedTuple, or a dict."""
    if dataclasses.is_dataclass(record):
        return to_dict(record)
    values = record._asdict() if hasattr(record, "_asdict") else dict(record)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def to_json_line(record) -> str:
    """A record as one line of JSON, non-ASCII text kept as it is."""
    return json.dumps(_plain(record), ensure_ascii=False, default=list)


def to_ascii_json_line(record) -> str:
    """For dead letters, which quote what could not be read: never fails to write."""
    return json.dumps(_plain(record), ensure_ascii=True, default=list)


class WriteLines(beam.PTransform):
    """Records -> one JSON object a line (`to_line`), in PREFIX-SSSSS-of-NNNNN+SUFFIX
    files through Beam's filesystems (local or gs://). An empty input still writes
    one empty file: a run that kept nothing says so with a file, not a missing one."""

    def __init__(self, prefix: str, to_line=to_json_line, suffix: str = ""):
        super().__init__()
        self._prefix = prefix
        self._to_line = to_line
        self._suffix = suffix

    def expand(self, records):
        return (records
                | "ToJson" >> beam.Map(self._to_line)
                | "Write" >> beam.io.WriteToText(self._prefix,
                                                 file_name_suffix=self._suffix))


class WriteJsonl(WriteLines):
    """Records -> OUTPUT_DIR/NAME/NAME-SSSSS-of-NNNNN.jsonl, a folder per kind as a
    run's outputs are laid out."""

    def __init__(self, output_dir: str, name: str, to_line=to_json_line):
        super().__init__(FileSystems.join(output_dir, name, name), to_line, ".jsonl")


class WriteAvro(beam.PTransform):
    """Records of one type -> OUTPUT_DIR/NAME/NAME-SSSSS-of-NNNNN.avro, with the Avro
    schema derived from `record_type` (a codeclm record dataclass)."""

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
    """OpenAI's chat fine-tuning JSONL: the instruction and the kept answer."""
    return json.dumps({"messages": [
        {"role": "user", "content": example.instruction},
        {"role": "assistant", "content": example.response}]}, ensure_ascii=False)


def alpaca_json(examples: list) -> str:
    """Alpaca's layout, one JSON array in a stable order (by example id)."""
    rows = [{"instruction": e.instruction, "input": "", "output": e.response}
            for e in sorted(examples, key=lambda e: e.example_id)]
    return json.dumps(rows, ensure_ascii=False, indent=1)


class WriteExports(beam.PTransform):
    """Examples -> fine-tuning files under OUTPUT_DIR/export/, one set per format:
    `vertex` (Vertex AI Gemini tuning JSONL), `openai` (chat `messages` JSONL) and
    `alpaca` (one JSON array). An unknown format is refused when the transform is
    built."""

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
