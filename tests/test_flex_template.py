"""The Flex Template's metadata.json matches the CLI's options, and its launcher turns
template parameters into flags the pipeline accepts."""
import json
import os

from codeclm_beam.pipelines.commands.templates import flex_template_metadata
from codeclm_beam.pipelines.commands.templates import launcher_argv
from codeclm_beam.pipelines.cli import _options_parser
from codeclm_beam.pipelines.run.answer_options import AnswerOptions
from codeclm_beam.options import ModelOptions
from codeclm_beam.pipelines.run.args import RunOptions
from codeclm_beam.pipelines.generate import GenerateOptions

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "..", "pipelines", "flex_template")


def test_committed_metadata_is_generated_from_the_cli_options():
    with open(os.path.join(TEMPLATE_DIR, "metadata.json")) as f:
        committed = json.load(f)
    assert committed == flex_template_metadata(), (
        "regenerate: python -m codeclm_beam.pipelines.commands.templates > "
        "pipelines/flex_template/metadata.json")
    parser = _options_parser("x", "x", GenerateOptions, AnswerOptions, RunOptions,
                             ModelOptions)
    cli_flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert {p["name"] for p in committed["parameters"]} == cli_flags
    assert [p["name"] for p in committed["parameters"] if not p["isOptional"]] == \
        ["output_dir"]


def test_launcher_translates_template_booleans():
    argv = launcher_argv(["--seeds=gs://b/s.jsonl", "--keep_unresolved=true",
                          "--no_cache=false", "--num_examples=10"])
    assert argv == ["--seeds=gs://b/s.jsonl", "--keep_unresolved", "--num_examples=10"]
    known, _ = _options_parser("x", "x", GenerateOptions, RunOptions, ModelOptions).parse_known_args(argv)
    assert known.keep_unresolved is True and known.no_cache is False
    assert known.num_examples == 10


def test_dockerfile_points_at_the_launcher_and_setup():
    text = open(os.path.join(TEMPLATE_DIR, "Dockerfile")).read()
    assert "pipelines/flex_template/main.py" in text and "setup.py" in text
    assert "[local]" not in text  # workers stay light
