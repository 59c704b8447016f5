"""Outputs on gs://, against a real Cloud Storage emulator on loopback: a run writes
under OUTPUT_DIR/runs/RUN_ID and becomes current when its record is written over the
pointer (manifest.json); a failed run leaves the previous one current and whole; a
folder of the user's is refused."""
import json
import uuid

import pytest
from apache_beam.io.filesystems import FileSystems

from codeclm_beam.pipelines.cli import main as cli_main
from tests.helpers import generate_args
from tests.helpers import scripted_models
from tests.helpers import write_seeds


def listing(prefix: str) -> dict[str, bytes]:
    found = {}
    for match in FileSystems.match([prefix + "/**"])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            found[match.path[len(prefix) + 1:]] = f.read()
    return found


def test_gs_outputs_are_staged_promoted_and_never_lost(tmp_path, gcs_emulator,
                                                       monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    out = f"gs://codeclm-test/run-{uuid.uuid4().hex[:8]}"
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)

    def generate(*extra, per_role=None):
        models = scripted_models(tmp_path, "strong_wins", per_role)
        return cli_main(["generate", *generate_args(
            tmp_path, models, seeds, out, "--num_metadata", "3", "--num_examples", "3",
            "--no_cache", *extra)])

    assert generate() == 0
    first = listing(out)
    manifest = json.loads(first["manifest.json"])
    run = manifest["run_folder"] + "/"
    # The run's files and its marker, the pointer; the lock is gone with the run.
    assert set(first) == {run + name for name in manifest["files"]} | {
        run + ".run", "manifest.json"}
    assert first[run + "manifest.json"] == first["manifest.json"]
    assert any(name.startswith(run + "examples/examples-") for name in first)

    with pytest.raises(Exception, match="scripted crash"):
        generate(per_role={"judge": {"crash": True}})
    assert listing(out) == first  # the failed run's staging is gone, the rest whole

    with FileSystems.create(out + "/examples/mine.jsonl") as f:
        f.write(b'{"mine": 1}\n')
    assert generate() == 2
    assert "examples/mine.jsonl" in capsys.readouterr().err
    assert listing(out)["examples/mine.jsonl"] == b'{"mine": 1}\n'
