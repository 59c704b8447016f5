"""ReadSeeds and ReadMetadata over every supported format and layout."""
import csv
import json

import apache_beam as beam
from apache_beam.transforms.error_handling import CollectingErrorHandler
import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from codeclm_beam.transforms import ReadMetadata
from codeclm_beam.transforms import ReadSeeds

LAYOUT_ROWS = [
    ({"instruction": "Summarise this.", "input": "A long text."},
     "Summarise this.\n\nInput: A long text."),
    ({"instruction": "Rewrite politely.", "instances": [{"input": "Give it back!",
                                                         "output": ""}]},
     "Rewrite politely.\n\nInput: Give it back!"),
    ({"prompt": "Koala prompt", "id": "k1"}, "Koala prompt"),
    ({"text": "Old Vicuna text", "question_id": 1}, "Old Vicuna text"),
    ({"question": "What is 2+2?"}, "What is 2+2?"),
    ({"Instruction": "Evol instruction", "idx": 3}, "Evol instruction"),
    ({"turns": ["New Vicuna turn", "follow-up"], "category": "x"}, "New Vicuna turn"),
    ({"messages": [{"role": "system", "content": "sys"},
                   {"role": "user", "content": "Chat question"}]}, "Chat question"),
    ({"conversations": [{"from": "human", "value": "ShareGPT question"}]},
     "ShareGPT question"),
]


def read(pattern, expected_seeds, check_dead, **kwargs):
    """Runs ReadSeeds; the seeds must equal `expected_seeds`, and `check_dead` gets a
    dict {element_id: message} of the dead letters (it runs inside the pipeline)."""
    with TestPipeline() as p:
        with CollectingErrorHandler() as dead_letters:
            out = p | ReadSeeds(pattern, **kwargs).with_error_handler(dead_letters)
        assert_that(out | beam.Map(lambda s: s.instruction),
                    equal_to(expected_seeds), label="seeds")
        assert_that(dead_letters.output() | beam.Map(lambda d: (d.element_id, d.message)),
                    lambda got: check_dead(dict(got)), label="dead")


def no_dead_letters(dead):
    assert dead == {}, dead


def test_every_layout_is_found_without_being_told(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(json.dumps(row) for row, _ in LAYOUT_ROWS) + "\n")
    read(str(path), [expected for _, expected in LAYOUT_ROWS], no_dead_letters)


def test_bad_rows_go_to_the_dead_letter_with_a_reason(tmp_path):
    path = tmp_path / "seeds.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"instruction": "Good one."}).encode() + b"\n")
        f.write(b"{not json}\n")
        f.write(b'{"instruction": "bad \xff\xfe utf8"}\n')
        f.write(json.dumps({"instruction": "   "}).encode() + b"\n")
        f.write(json.dumps({"instruction": 42}).encode() + b"\n")
        f.write(json.dumps({"instruction": "x" * 500}).encode() + b"\n")
        f.write(json.dumps(["a", "list"]).encode() + b"\n")
        f.write(json.dumps({"title": "no instruction here"}).encode() + b"\n")
        f.write(json.dumps({"instruction": "Good one."}).encode() + b"\n")  # duplicate
    def check(reasons):
        assert len(reasons) == 7, reasons
        assert "not valid JSON" in reasons[f"{path}:2"]
        assert "UTF-8" in reasons[f"{path}:3"]
        assert "empty" in reasons[f"{path}:4"]
        assert "not text" in reasons[f"{path}:5"]
        assert "over the limit of 100" in reasons[f"{path}:6"]
        assert "not an object" in reasons[f"{path}:7"]
        assert "--instruction_field" in reasons[f"{path}:8"]

    read(str(path), ["Good one."], check, max_chars=100)


def test_instruction_field_overrides_with_a_dotted_path(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps({"data": {"turns": ["Nested first", "second"]}}) + "\n")
    read(str(path), ["Nested first"], no_dead_letters, instruction_field="data.turns.0")


def test_formats_json_csv_parquet_avro(tmp_path):
    rows = [{"instruction": f"Task {i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with open(tmp_path / "b.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "category"])
        writer.writeheader()
        writer.writerow({"prompt": "CSV task, with comma\nand newline", "category": "x"})
    pq.write_table(pa.Table.from_pylist([{"question": "Parquet task"}]),
                   tmp_path / "c.parquet")
    schema = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "text", "type": "string"}]})
    with open(tmp_path / "d.avro", "wb") as f:
        fastavro.writer(f, schema, [{"text": "Avro task"}])
    (tmp_path / "e.xml").write_text("<x/>")
    def check(reasons):
        assert list(reasons) == [str(tmp_path / "e.xml")], reasons
        assert "unknown file format" in reasons[str(tmp_path / "e.xml")]

    read(str(tmp_path / "*"), ["Task 0", "Task 1", "Task 2",
                               "CSV task, with comma\nand newline", "Parquet task",
                               "Avro task"], check)


def test_read_metadata_for_scenario_two(tmp_path):
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"use_case": "Code Generation", "skills": ["Python", "knowledge"]},
        {"use_case": "creative writing", "skills": "poetry; imagery"},
        {"use_case": "", "skills": ["x"]},
        {"skills": ["x"]},
    ]) + "\n")
    with TestPipeline() as p:
        with CollectingErrorHandler() as dead_letters:
            out = p | ReadMetadata(str(path)).with_error_handler(dead_letters)
        assert_that(out | beam.Map(lambda m: (m.use_case, m.skills, m.origin)),
                    equal_to([("code generation", ("python",), "user"),
                              ("creative writing", ("poetry", "imagery"), "user")]),
                    label="metadata")
        assert_that(dead_letters.output() | beam.combiners.Count.Globally(), equal_to([2]),
                    label="dead")


def test_compressed_seed_files_are_read_as_the_plain_ones(tmp_path):
    import bz2
    import gzip
    lines = b'{"instruction": "Write a haiku about rivers."}\n{"prompt": "Plan a trip."}\n'
    (tmp_path / "seeds.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "seeds.jsonl.bz2").write_bytes(bz2.compress(lines))
    for name in ("seeds.jsonl.gz", "seeds.jsonl.bz2"):
        read(str(tmp_path / name), ["Write a haiku about rivers.", "Plan a trip."],
             no_dead_letters)
