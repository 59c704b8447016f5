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

The Beam sinks that write them are the library's (`codeclm_beam.sinks`); this module
reads and writes the run's whole files (records, JSONL folders).
"""
from __future__ import annotations

import json
from typing import Any

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.pipelines.run.commit import read_json  # noqa: F401 (re-exported)
from codeclm_beam.pipelines.run.commit import write_whole as write_text


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
