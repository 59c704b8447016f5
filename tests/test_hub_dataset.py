"""The output folder as a Hugging Face dataset, loaded with the real `datasets` library,
and `codeclm-beam push` driven through the real `huggingface_hub` client against a
loopback Hub (tests/hub_server.py) pointed at with HF_ENDPOINT: a contract test.

One generate run (scripted models, a judge that separates about half the candidates,
--keep_unresolved so that even pairs are kept too) serves every test of the file."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.hub_server import HubServer

TOKEN = "hf_" + "T0ken" * 7
CLI = "import sys; from codeclm_beam.pipelines.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    models = scripted_models(tmp, "half")
    seeds = write_seeds(tmp / "seeds.jsonl", 6)
    out = tmp / "out"
    manifest = run_generate(generate_args(
        tmp, models, seeds, out, "--num_examples", "12", "--num_instructions", "16",
        "--max_iterations", "2", "--keep_unresolved", "--validation_share", "0.3",
        "--no_report"))
    return out, manifest


@pytest.fixture(scope="module")
def hub():
    server = HubServer(TOKEN)
    yield server
    server.stop()


def push(hub, out, repo, *extra, token=TOKEN, wait=True):
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token,
           "HF_HUB_DISABLE_XET": "1",  # the LFS protocol, which this Hub serves
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(out.parent / "hf_home")}
    command = [sys.executable, "-c", CLI, "push", str(out), repo, *extra]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_each_configuration_loads_with_datasets_and_matches_the_manifest(run, tmp_path):
    import datasets
    out, manifest = run
    examples = {e["example_id"]: e for e in read_jsonl(out, "examples")}
    counts = manifest["dataset"]["configurations"]
    assert sum(counts["sft"].values()) == len(examples) == 12
    assert counts["sft"]["validation"] > 0  # the split was asked for and is used
    loaded = {name: datasets.load_dataset(str(out), name, cache_dir=str(tmp_path))
              for name in ("sft", "preference", "examples")}
    for name, dataset in loaded.items():
        assert {split: len(rows) for split, rows in dataset.items()} == \
            {split: n for split, n in counts[name].items() if n}, name
    assert loaded["sft"]["train"].column_names == ["example_id", "messages"]
    assert set(loaded["preference"]["train"].column_names) >= {
        "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "gap"}
    assert set(loaded["examples"]["train"].column_names) >= set(next(iter(
        examples.values())))
    # The default configuration is sft; the split is tune's.
    assert datasets.load_dataset(str(out), cache_dir=str(tmp_path))["train"].num_rows == \
        counts["sft"]["train"]
    from codeclm_beam.tuning import validation_bucket
    for row in loaded["sft"]["validation"]:
        assert validation_bucket(row["messages"][0]["content"]) < 0.3
    for row in loaded["sft"]["train"]:
        pair = examples[row["example_id"]]
        assert row["messages"] == [{"role": "user", "content": pair["instruction"]},
                                   {"role": "assistant", "content": pair["response"]}]


def test_preference_rows_choose_the_answer_the_judge_scored_higher(run, tmp_path):
    import datasets
    out, manifest = run
    examples = {e["example_id"]: e for e in read_jsonl(out, "examples")}
    rows = [row for split in datasets.load_dataset(
        str(out), "preference", cache_dir=str(tmp_path)).values() for row in split]
    even = [e for e in examples.values() if e["strong_score"] == e["target_score"]]
    assert rows and even, "the run should keep both separated and even pairs"
    assert len(rows) + len(even) == len(examples)
    assert manifest["dataset"]["preference_left_out_even"] == len(even)
    for row in rows:
        pair = examples[row["example_id"]]
        answers = {pair["response_source"]: pair["response"],
                   ({"strong", "target"} - {pair["response_source"]}).pop():
                       pair["other_response"]}
        higher = "strong" if pair["strong_score"] > pair["target_score"] else "target"
        lower = "target" if higher == "strong" else "strong"
        assert row["chosen"] == [{"role": "assistant", "content": answers[higher]}]
        assert row["rejected"] == [{"role": "assistant", "content": answers[lower]}]
        assert row["prompt"] == [{"role": "user", "content": pair["instruction"]}]
        assert row["score_chosen"] == pair[f"{higher}_score"] > row["score_rejected"]
        assert row["gap"] == row["score_chosen"] - row["score_rejected"]


def test_the_card_names_the_configurations_the_settings_and_the_rounds(run):
    import yaml
    out, manifest = run
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    metadata = yaml.safe_load(card.split("---", 2)[1])
    assert [c["config_name"] for c in metadata["configs"]] == ["sft", "preference",
                                                               "examples"]
    assert metadata["license"] == "other"
    assert 'datasets.load_dataset("OUTPUT_DIR", "sft")' in card
    assert manifest["models"]["judge"] in card
    rounds = manifest["accounting"]["candidates"]["rounds"]
    assert f"| 1 | {rounds[0]['candidates']} | {rounds[0]['kept']} |" in card
    assert "Contamination: not checked" in card
    judge = manifest["model_calls"]["by_stage"]["judge"]["models"]
    assert f"| judge | {sum(m['requests'] for m in judge.values())} |" in card


def test_push_contract_first_push_then_nothing_new(run, hub):
    out, manifest = run
    hub.reset_log()
    first = push(hub, out, "me/codeclm-pilot")
    assert first.returncode == 0, first.stderr
    repo = hub.repos["me/codeclm-pilot"]
    assert repo.private
    data = sorted(f for f in manifest["files"] if f.startswith("data/"))
    assert sorted(p for p in repo.files if p.startswith("data/")) == data
    for relative in data:
        assert hub.content("me/codeclm-pilot", relative) == (out / relative).read_bytes()
        assert "lfs" in repo.files[relative]  # Parquet went through LFS
    card = hub.content("me/codeclm-pilot", "README.md").decode()
    assert 'load_dataset("me/codeclm-pilot", "preference")' in card
    first_requests = list(hub.requests)
    assert hub.count("PUT", "/lfs-upload/") == len(data)
    assert hub.count("POST", "/commit/") == 1

    hub.reset_log()
    again = push(hub, out, "me/codeclm-pilot")
    assert again.returncode == 0, again.stderr
    assert "nothing to send" in again.stderr
    assert hub.count("PUT", "/lfs-upload/") == 0 and hub.count("POST", "/commit/") == 0
    assert len(hub.requests) == 2, hub.requests  # create (409) and the tree listing
    print(f"push requests: first {len(first_requests)}, repeated {len(hub.requests)}")
    for result in (first, again):
        assert TOKEN not in result.stdout + result.stderr


def test_a_push_killed_before_its_commit_resumes_without_sending_again(run, hub):
    out, manifest = run
    hub.reset_log()
    hub.hold_commits.set()
    hub.commit_arrived.clear()
    hub.release_commit.clear()
    child = push(hub, out, "me/killed", wait=False)
    try:
        assert hub.commit_arrived.wait(120), "the push never reached its commit"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        hub.hold_commits.clear()
        hub.release_commit.set()
    sent_before_kill = hub.count("PUT", "/lfs-upload/")
    assert sent_before_kill > 0
    assert not any(p.startswith("data/") for p in hub.repos["me/killed"].files)
    hub.reset_log()
    resumed = push(hub, out, "me/killed")
    assert resumed.returncode == 0, resumed.stderr
    assert hub.count("PUT", "/lfs-upload/") == 0  # every object was already there
    assert hub.count("POST", "/commit/") == 1
    assert sorted(p for p in hub.repos["me/killed"].files if p.startswith("data/")) == \
        sorted(f for f in manifest["files"] if f.startswith("data/"))


def test_a_repository_with_another_runs_data_is_refused_unless_replaced(run, hub):
    out, _ = run
    hub.repos.pop("me/taken", None)
    assert push(hub, out, "me/taken").returncode == 0
    repo = hub.repos["me/taken"]
    # Another run pushed here: its marker and a file this run does not have.
    repo.files["codeclm_beam_run.json"] = {"content": b'{"run_id": "another"}\n'}
    repo.files["data/sft/train-00000-of-00009.parquet"] = {"content": b"old"}
    refused = push(hub, out, "me/taken")
    assert refused.returncode == 2
    assert "holds another run's data" in refused.stderr and "--replace" in refused.stderr
    assert "data/sft/train-00000-of-00009.parquet" in repo.files
    replaced = push(hub, out, "me/taken", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert "data/sft/train-00000-of-00009.parquet" not in repo.files
    assert json.loads(hub.content("me/taken", "codeclm_beam_run.json"))["run_id"] == \
        run[1]["run_id"]


def test_a_wrong_token_is_one_line_without_the_token(run, hub):
    out, _ = run
    wrong = "hf_" + "Wr0ng" * 7
    result = push(hub, out, "me/unauthorised", token=wrong)
    assert result.returncode == 2
    assert "the Hub refused the push" in result.stderr
    assert wrong not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_generate_pushes_after_its_commit_with_push_to_hub(hub, tmp_path):
    models = scripted_models(tmp_path, "strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN,
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", CLI, "generate", *generate_args(
            tmp_path, models, seeds, out, "--num_examples", "3", "--num_metadata", "3",
            "--max_iterations", "1", "--no_report", "--push_to_hub", "me/from-generate")],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    pushed = sorted(p for p in hub.repos["me/from-generate"].files if p.startswith("data/"))
    assert pushed == sorted(f for f in manifest["files"] if f.startswith("data/"))
    assert TOKEN not in result.stdout + result.stderr
