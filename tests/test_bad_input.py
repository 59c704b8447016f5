"""Property-based tests: ReadSeeds never crashes on bad input, sends every bad row to
the dead letter with a reason, and lets every good row through."""
import io
import json
import types

import apache_beam as beam
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from codeclm_beam.records import DeadLetter
from codeclm_beam.records import Seed
from codeclm_beam.transforms.read_seeds import STAGE
from codeclm_beam.transforms.read_seeds import _ParseFile
from codeclm_beam.transforms.read_seeds import make_seed

MAX_CHARS = 200


class FakeReadable:
    """What fileio.ReadMatches hands the DoFn: a path and a binary stream."""

    def __init__(self, path, data: bytes):
        self.metadata = types.SimpleNamespace(path=path)
        self._data = data

    def open(self):
        return io.BytesIO(self._data)


def parse(path, data):
    fn = _ParseFile(STAGE, lambda source, row: make_seed(source, row, None, MAX_CHARS))
    seeds, dead = [], []
    for out in fn.process(FakeReadable(path, data)):
        if isinstance(out, beam.pvalue.TaggedOutput):
            assert isinstance(out.value, DeadLetter) and out.value.message
            dead.append(out.value)
        else:
            assert isinstance(out, Seed)
            seeds.append(out)
    return seeds, dead


good_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                    max_size=MAX_CHARS).filter(lambda t: t.strip())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8), children, max_size=4), max_leaves=20)
bad_rows = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: b.strip() and b"\n" not in b),
    json_values.map(lambda v: json.dumps({"instruction": v}).encode()),  # wrong types
    st.integers(MAX_CHARS + 1, 5000).map(
        lambda n: json.dumps({"instruction": "x" * n}).encode()),  # too long
    st.integers(100, 3000).map(lambda depth: (b"[" * depth + b"]" * depth)),  # deep
    st.just(b'{"instruction": "\xff\xfe\xfd"}'),  # invalid UTF-8
    st.just(b'{"text": ""}'), st.just(b'{"turns": []}'), st.just(b"[1, 2]"),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(good=st.lists(good_text, max_size=8, unique_by=lambda t: t.strip()),
       bad=st.lists(bad_rows, max_size=8), data=st.data())
def test_jsonl_rows_are_seeds_or_dead_letters(good, bad, data):
    lines = [json.dumps({"instruction": t}).encode() for t in good] + list(bad)
    order = data.draw(st.permutations(range(len(lines))))
    payload = b"\n".join(lines[i] for i in order) + b"\n"
    seeds, dead = parse("gs://bucket/seeds.jsonl", payload)
    # Every good row comes through (a random "bad" line may itself be a valid seed).
    assert {t.strip() for t in good} <= {s.instruction for s in seeds}
    non_blank = [line for line in lines if line.strip()]
    assert len(seeds) + len(dead) == len(non_blank)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_in_every_format_never_crash(data):
    for ext in ("jsonl", "json", "csv", "parquet", "avro", "xml"):
        seeds, dead = parse(f"/tmp/x.{ext}", data)
        for seed in seeds:
            assert seed.instruction.strip()


def test_empty_files_yield_nothing_and_no_crash():
    for ext in ("jsonl", "json", "csv"):
        assert parse(f"/tmp/empty.{ext}", b"") == ([], [])
    # An empty Parquet or Avro file is not a valid file of that format: one dead
    # letter that names the file.
    for ext in ("parquet", "avro"):
        seeds, dead = parse(f"/tmp/empty.{ext}", b"")
        assert seeds == [] and [d.element_id for d in dead] == [f"/tmp/empty.{ext}"]
