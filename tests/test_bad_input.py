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

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelFailure
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse
from codeclm_beam.model import Usage
from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.sinks import to_ascii_json_line
from codeclm_beam.sinks import to_json_line
from codeclm_beam.records import DeadLetter
from codeclm_beam.records import Seed
from codeclm_beam.transforms.read_seeds import STAGE
from codeclm_beam.transforms.read_rows import ParseRows
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
    fn = ParseRows(STAGE, lambda path: lambda source, row: make_seed(
        source, row, None, MAX_CHARS))
    fn.setup()
    seeds, dead = [], []
    for out in fn.process(FakeReadable(path, data)):
        if isinstance(out, beam.pvalue.TaggedOutput):
            assert isinstance(out.value, DeadLetter) and out.value.message
            dead.append(out.value)
        else:
            assert isinstance(out, Seed)
            seeds.append(out)
    # The writers cannot fail on what passed the reader, nor on a dead letter.
    for seed in seeds:
        to_json_line(seed).encode("utf-8")
    for letter in dead:
        to_ascii_json_line(letter).encode("utf-8")
    return seeds, dead


good_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                    max_size=MAX_CHARS).filter(lambda t: t.strip())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8), children, max_size=4), max_leaves=20)
# Any text, lone surrogates included: JSON's "\\ud800" escapes carry them into Python.
any_text = st.text(st.characters(exclude_categories=()), min_size=1, max_size=60)
bad_rows = st.one_of(
    any_text.filter(lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in t)).map(
        lambda t: json.dumps({"instruction": "x " + t}).encode()),  # lone surrogates
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


class _Answers(Backend):
    """Answers each request with the next text of a list (any text at all)."""

    def __init__(self, texts):
        self._texts = list(texts)

    def generate(self, request):
        return RawAnswer(self._texts.pop(0), "stop", Usage(1, 0, 1))


@settings(max_examples=150, deadline=None)
@given(answers=st.lists(any_text, min_size=3, max_size=3),
       schema=st.sampled_from([None, {"type": "object"}]))
def test_any_model_answer_is_a_response_or_a_failure_and_can_be_written(tmp_path_factory,
                                                                        answers, schema):
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    client = ModelClient(ModelConfig(uri="custom:x.y:Z", cache_dir=cache_dir),
                         backend=_Answers(answers))
    result = client.call(ModelRequest.create(
        "r", [ChatMessage("user", "hi")], GenerationSettings(0.0, 64), schema))
    if isinstance(result, ModelResponse):
        result.text.encode("utf-8")  # cacheable and writable
        assert client.cache.lookup(ModelRequest.create(
            "r", [ChatMessage("user", "hi")], GenerationSettings(0.0, 64), schema
        )) is not None
    else:
        assert isinstance(result, ModelFailure) and result.reason in ("schema",)
        to_ascii_json_line(DeadLetter.of("s", "r", ValueError(result.message),
                                         raw_answer=result.raw_answer)).encode("utf-8")
