"""The package installs `transforms/` and `pipelines/` as codeclm_beam.transforms and
codeclm_beam.pipelines, in a wheel as in the editable install, and its CLI answers."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from codeclm_beam.pipelines.cli import main
from tests.helpers import generate_args
from tests.helpers import scripted_models
from tests.helpers import write_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_maps_transforms_and_pipelines_under_codeclm_beam(tmp_path):
    # Built from a copy: a build in the checkout leaves build/ there, which shadows
    # the `build` module when Beam stages --setup_file with `python -m build`.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "out", "codeclm_cache", "*.egg-info", "benchmarks",
        ".pytest_cache", ".hypothesis", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                   check=True)
    (wheel,) = tmp_path.glob("codeclm_beam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "codeclm_beam/transforms/encode.py" in names
    assert "codeclm_beam/pipelines/generate.py" in names
    assert "codeclm_beam/model/backends/google.py" in names
    assert "codeclm_beam/transforms/prompts/encode.txt" in names  # templates ship
    top_level = {n.split("/")[0] for n in names if not n.endswith(".dist-info/")}
    assert top_level <= {"codeclm_beam", wheel.name.split("-")[0] + "-" +
                         wheel.name.split("-")[1] + ".dist-info"}, top_level
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [l for l in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if l.startswith("Requires-Dist")]
    core = [r for r in requires if "extra ==" not in r]
    # A range of Beam releases, never one minor: a user's pipeline brings its own.
    beam = next(r for r in core if "apache-beam[gcp]" in r)
    assert ">=2.71" in beam and "<2.78" in beam and "==" not in beam, beam
    assert any("Requires-Python: <3.14,>=3.11" in line or
               "Requires-Python: >=3.11,<3.14" in line
               for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines())
    assert not any("llama" in r for r in core), "llama.cpp must stay an extra"


def test_editable_install_imports_the_mapped_packages():
    import codeclm_beam.pipelines.generate as generate
    import codeclm_beam.transforms.encode as encode
    assert encode.__file__.endswith(os.path.join("transforms", "encode.py"))
    assert generate.__file__.endswith(os.path.join("pipelines", "generate.py"))


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--strong_model" in out and "--num_examples" in out and "--runner" in out


def test_cli_refuses_a_bad_model_uri_early(tmp_path, capsys):
    assert main(["generate", "--seeds", "x.jsonl", "--output_dir", str(tmp_path),
                 "--strong_model", "gpt4"]) == 2
    err = capsys.readouterr().err
    assert "not BACKEND:MODEL" in err and "Traceback" not in err


def test_cli_generate_prints_its_summary_without_beam_noise(tmp_path):
    models = scripted_models(tmp_path, "strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)
    script = os.path.join(os.path.dirname(sys.executable), "codeclm-beam")
    done = subprocess.run(
        [script, "generate", *generate_args(tmp_path, models, seeds, tmp_path / "out",
                                             "--num_metadata", "3", "--num_examples",
                                             "4", "--no_report")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT})  # the scripted backend lives in tests/
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accounting balanced: True" in done.stdout
    assert "codeclm-beam plan" in done.stdout
    assert "Resource module is not available" not in done.stderr
