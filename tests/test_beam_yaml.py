"""The stages in Beam YAML: the shipped example runs through Beam's own YAML entry point
(apache_beam.yaml.main) on the DirectRunner with scripted models, and every element
comes out as a kept pair, an improved candidate or a dead letter."""
import json
import os

import pytest
from apache_beam.yaml import main as yaml_main
from apache_beam.yaml import yaml_provider

from codeclm_beam.transforms.beam_yaml import PROVIDERS
from tests.helpers import scripted_models

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples",
                       "codeclm_stages.beam.yaml")


def _rows(directory, name):
    rows = []
    for file in sorted(os.listdir(directory)):
        if file.startswith(name):
            with open(os.path.join(directory, file)) as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def test_the_example_runs_through_beams_yaml_entry_point(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(row) + "\n" for row in [
        {"instruction": "Write a haiku about rivers."},
        {"instruction": "Plan a budget for a week of travel."},
        {"prompt": 42},  # not an instruction: a dead letter, with the reason
    ]))
    # The judge separates about half the instructions (by their hash) and ties the
    # rest: kept pairs and undecided candidates both occur.
    models = scripted_models(tmp_path, judge="half")
    out = tmp_path / "out"
    yaml_main.run(argv=[
        f"--yaml_pipeline_file={EXAMPLE}",
        "--jinja_variables=" + json.dumps({
            "seeds": str(seeds), "out": str(out), "strong_model": models["strong"],
            "target_model": models["target"], "judge_model": models["judge"]}),
        "--runner=DirectRunner"])
    kept, improved = _rows(out, "kept"), _rows(out, "improved")
    dead = _rows(out, "dead_letters")
    assert [d["stage"] for d in dead] == ["read_seeds"]
    assert "not text" in dead[0]["message"]
    # 2 pool entries x 2 instructions each: every candidate is kept or improved.
    assert len(kept) + len(improved) == 4
    assert all(k["response_source"] in ("strong", "target") for k in kept)
    assert all(c["iteration"] == 2 and len(c["history"]) == 1 for c in improved)


def test_a_stage_without_error_handling_is_refused():
    from codeclm_beam.transforms.beam_yaml import EncodeMetadata
    with pytest.raises(ValueError, match="error_handling"):
        EncodeMetadata(error_handling=None)


def test_the_shipped_provider_file_provides_every_stage():
    provided = set()
    for provider in yaml_provider.load_providers(PROVIDERS):
        provided.update(provider.provided_transforms())
    assert provided == {"ReadSeeds", "EncodeMetadata", "BuildMetadataPool",
                        "GenerateRubrics", "DecodeInstructions", "ContrastiveFilter",
                        "ImproveInstructions", "CodecLM", "DeduplicateInstructions",
                        "Decontaminate", "WriteJsonLines"}


def test_the_shipped_provider_file_is_the_one_the_stages_give():
    # Written by `python -m codeclm_beam.transforms.beam_yaml > transforms/providers.yaml`;
    # a stage given a YAML face (Stage.yaml) and not written there fails here.
    from codeclm_beam.transforms.beam_yaml import providers_yaml
    with open(PROVIDERS) as f:
        assert f.read() == providers_yaml()


def test_the_example_through_codeclm_beam_yaml_writes_every_output_and_caches(
        tmp_path, capsys):
    from codeclm_beam.pipelines.cli import main as cli_main
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in
                             ["Write a haiku about rivers.", "Plan a week of travel."]))
    # A judge that separates nothing: no pair is kept, and the file says so.
    models = scripted_models(tmp_path, judge="tie")
    out = tmp_path / "out"
    assert cli_main(["yaml", EXAMPLE, "--jinja_variables=" + json.dumps({
        "seeds": str(seeds), "out": str(out), "strong_model": models["strong"],
        "target_model": models["target"], "judge_model": models["judge"]})]) == 0
    printed = capsys.readouterr()
    assert "codeclm-beam yaml finished:" in printed.out
    assert "Could not load ML transform module" not in printed.err
    written = sorted(os.listdir(out))
    assert "kept.jsonl-00000-of-00001" in written and _rows(out, "kept") == []
    assert "dead_letters.jsonl-00000-of-00001" in written and _rows(out, "dead_letters") == []
    assert len(_rows(out, "improved")) == 4
    assert any((out / "cache").rglob("*.json"))  # a killed run resumes from it


def test_the_example_names_an_in_process_runner_that_downloads_nothing():
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.yaml.main import build_pipeline_components_from_argv
    options, _, _ = build_pipeline_components_from_argv(
        [f"--yaml_pipeline_file={EXAMPLE}"])
    # DirectRunner would try Prism first (a download from GitHub); FnApiRunner is
    # the in-process runner it falls back to.
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
