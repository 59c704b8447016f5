"""A user's first hour, round three (issue 45): option mistakes end in one line and
exit 2 before anything is read, written or asked of a model."""
import os

import pytest

from codeclm_beam.pipelines.cli import main as cli_main
from tests.helpers import calls_by_kind
from tests.helpers import generate_args
from tests.helpers import scripted_models
from tests.helpers import write_seeds


def exit_code(argv) -> int:
    """The CLI's status, whether it returns it or argparse exits with it."""
    try:
        return cli_main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("flag, value, says", [
    ("--max_concurrency", "0", "must be at least 1"),
    ("--max_concurrency", "-3", "must be at least 1"),
    ("--max_retries", "-1", "must be at least 0"),
    ("--max_parse_retries", "-1", "must be at least 0"),
    ("--max_truncation_retries", "-1", "must be at least 0"),
    ("--dedup_threshold", "2", "must be at most 1"),
    ("--dedup_ngram_size", "0", "must be at least 1"),
    ("--overgenerate_margin", "-5", "must be at least 0"),
    ("--max_error_share", "-1", "must be at least 0"),
    ("--judge_temperature", "nan", "not a finite number"),
    ("--temperature", "5", "must be at most 2"),
    ("--max_requests_per_minute", "-1", "must be over 0"),
    ("--request_timeout", "0", "must be over 0"),
])
def test_an_option_out_of_its_range_is_one_line_before_anything(tmp_path, capsys, flag,
                                                                value, says):
    models = scripted_models(tmp_path, "strong_wins")
    status = exit_code(["generate", *generate_args(
        tmp_path, models, write_seeds(tmp_path / "s.jsonl", 2), tmp_path / "out",
        "--num_examples", "2", flag, value)])
    err = capsys.readouterr().err
    assert status == 2 and f"argument {flag}: {value}: " in err and says in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not calls_by_kind(tmp_path) and not (tmp_path / "out").exists()


def test_other_commands_and_a_missing_backend_class_are_refused_the_same_way(
        tmp_path, capsys):
    assert exit_code(["plan", str(tmp_path), "--num_examples", "-5"]) == 2
    assert exit_code(["evaluate", "--benchmark", "x.jsonl", "--bootstrap_samples",
                      "0"]) == 2
    assert exit_code(["report", str(tmp_path), "--prices", str(tmp_path / "no.json")]) == 2
    status = cli_main(["generate", *generate_args(
        tmp_path, {"strong": "custom:nosuch.module:Cls", "target": "custom:nosuch.module:Cls",
                   "judge": "custom:nosuch.module:Cls"},
        write_seeds(tmp_path / "s.jsonl", 2), tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot load nosuch.module:Cls" in err
    assert "--prices" in err and "no such file" in err and "Traceback" not in err


def test_ctrl_c_ends_in_one_message_that_says_the_rerun_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from tests.scripted_backend import read_calls
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    models = scripted_models(tmp_path, judge="strong_wins", latency_s=0.3)
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    argv = generate_args(tmp_path, models, seeds, tmp_path / "out", "--num_examples", "4",
                         "--num_metadata", "4", "--quiet")
    # A CI launched in the background by a non-interactive shell ignores SIGINT, and an
    # ignored signal is inherited: Python would then never raise KeyboardInterrupt and the
    # run would finish as if no one had pressed Ctrl-C. A terminal's child has the default.
    running = subprocess.Popen(
        [sys.executable, "-m", "codeclm_beam.pipelines.cli", "generate", *argv],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (tmp_path / "calls").exists() or len(read_calls(tmp_path / "calls")) < 3:
        assert time.time() < deadline and running.poll() is None, running.communicate()
        time.sleep(0.1)
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=120)
    assert running.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("codeclm-beam generate: interrupted")
    assert "Run the same command again to resume" in err
    # And it does: the answers paid for before Ctrl-C are not asked again.
    asked_before = {call["key"] for call in read_calls(tmp_path / "calls")[:-2]}
    count_before = len(read_calls(tmp_path / "calls"))
    assert exit_code(["generate", *argv]) == 0
    asked_after = {call["key"] for call in read_calls(tmp_path / "calls")[count_before:]}
    assert not asked_before & asked_after


def test_a_run_leaves_no_shared_quota_files_in_the_temp_folder(tmp_path):
    import glob
    import json
    import tempfile
    models = scripted_models(tmp_path, judge="strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 2)
    argv = generate_args(tmp_path, models, seeds, tmp_path / "out", "--num_examples", "1",
                         "--num_metadata", "2", "--max_iterations", "1",
                         "--max_requests_per_minute", "6000", "--quiet")
    assert exit_code(["generate", *argv]) == 0
    run_id = json.loads((tmp_path / "out" / "manifest.json").read_text())["run_id"]
    assert run_id
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"codeclm-quota-{run_id}-*"))


def test_the_summarys_counts_add_up_round_by_round(tmp_path):
    import re
    from codeclm_beam.pipelines.cli import _summary
    from tests.helpers import run_generate
    models = scripted_models(tmp_path, judge="half", duplicate_every=3)
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_examples", "4",
        "--num_metadata", "4", "--num_instructions", "12", "--max_iterations", "2"))
    summary = _summary(manifest)
    rounds = re.findall(r"round \d+: (\d+) candidates \(\d+ fresh from the reserve\): "
                        r"(?:(\d+) removed before judging, )?(\d+) kept, "
                        r"(\d+) within threshold", summary)
    assert rounds, summary
    for candidates, removed, kept, within in rounds:
        assert int(candidates) == int(removed or 0) + int(kept) + int(within), summary
    assert any(removed for _, removed, _, _ in rounds), summary
    pool = manifest["accounting"]["metadata_pool"]
    assert f"metadata pool: {pool['entries']} entries ({pool['asked']} asked)" in summary


def test_the_yaml_summary_tells_answered_from_failed():
    from codeclm_beam import metrics
    from codeclm_beam.metrics import RunCounters
    from codeclm_beam.pipelines.commands.yaml_run import summary
    namespace = metrics.model_namespace("answer_target", "scripted")
    counters = RunCounters({namespace: {"elements": 5, "failures": 1, "requests": 7,
                                        "cache_hits": 0}})
    assert "answer_target: 4 answered, 1 failed (7 requests, 0 from the cache)" in \
        summary(counters)


def test_many_seeds_are_sampled_to_what_the_pool_needs(tmp_path):
    from codeclm_beam.pipelines.cli import _summary
    from tests.helpers import run_generate
    models = scripted_models(tmp_path, judge="strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 12)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_examples", "2",
        "--num_metadata", "3", "--max_iterations", "1", "--max_seeds", "5"))
    acc = manifest["accounting"]
    assert acc["balanced"], acc["checks"]
    assert acc["seeds"]["encoded"] == 5 and acc["seeds"]["not_sampled"] == 7
    assert calls_by_kind(tmp_path)["encode"] == 5
    assert "5 of the 12 seeds encoded: a seeded sample" in _summary(manifest)
    # `all` encodes every seed, and bad counts are refused before anything runs.
    assert exit_code(["generate", *generate_args(
        tmp_path, models, seeds, tmp_path / "bad", "--max_seeds", "0")]) == 2
