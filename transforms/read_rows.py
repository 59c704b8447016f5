"""The one row parser: a file's rows (`codeclm_beam.rows`), each made into a record or
a dead letter with reason `bad_input`. Seeds, user metadata and benchmark items are
read with it; only how a row becomes a record differs."""
from __future__ import annotations

import json
from typing import Any, Callable

import apache_beam as beam
from apache_beam.io import fileio

from codeclm_beam import metrics
from codeclm_beam.records import DeadLetter
from codeclm_beam.rows import RowError
from codeclm_beam.rows import iter_rows
from codeclm_beam.stage import DEAD_LETTER

# (source "path:line", row) -> record; raises for a row that makes none.
MakeRecord = Callable[[str, Any], Any]


class ParseRows(beam.DoFn):
    """One file -> its records, and a dead letter for each row that makes none (or
    for the file, when it cannot be read). `make_for_file(path)` gives the file's
    `MakeRecord`: one per file, so it may remember what it saw in that file."""

    def __init__(self, stage: str, make_for_file: Callable[[str], MakeRecord],
                 rows=iter_rows):
        self._stage = stage
        self._make_for_file = make_for_file
        self._rows_of = rows

    def setup(self):
        self._rows = metrics.flow_counter(metrics.rows_read(self._stage))

    def process(self, readable: fileio.ReadableFile):
        path = readable.metadata.path
        make = self._make_for_file(path)
        try:
            with readable.open() as handle:
                for source, row in self._rows_of(path, handle):
                    self._rows.inc()
                    try:
                        if isinstance(row, RowError):
                            raise row
                        yield make(source, row)
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
