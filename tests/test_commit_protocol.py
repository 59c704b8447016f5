"""Nothing lost, round three (issue 43): the output folder's commit protocol. Each
defect the hostile probe found, reproduced as it found it; kills by the protocol's own
test hook (CODECLM_BEAM_TEST_KILL_AT), races between real processes, a full disk and a
read-only folder on real tmpfs mounts where the test may mount one."""
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.cli import main as cli_main
from codeclm_beam.pipelines.run.commit import COMMIT_STEPS
from codeclm_beam.pipelines.run.commit import KILL_AT_ENV
from codeclm_beam.pipelines.run.commit import NotCommitted
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.commit import read_committed
from tests.helpers import calls_by_kind
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import scripted_models
from tests.helpers import write_seeds


def generate(tmp_path, out, *extra, judge="strong_wins"):
    models = scripted_models(tmp_path, judge)
    return cli_main(["generate", *generate_args(
        tmp_path, models, write_seeds(tmp_path / "seeds.jsonl", 3), out,
        "--num_metadata", "3", "--num_examples", "3", *extra)])


def requests(tmp_path) -> int:
    return sum(calls_by_kind(tmp_path).values())


# ---- 1. a symlink never leads a run outside its folder -------------------------------

def test_symlinked_structure_is_refused_and_never_followed(tmp_path, capsys):
    scratch = tmp_path / "scratch"
    (scratch / "sub").mkdir(parents=True)
    (scratch / "sub" / "keep.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".staging").symlink_to("../scratch")  # an earlier version's staging name
    assert generate(tmp_path, out) == 2
    assert ".staging" in capsys.readouterr().err and not requests(tmp_path)
    assert generate(tmp_path, out, "--force") == 0  # written beside it, never into it
    assert (scratch / "sub" / "keep.txt").read_text() == "keep me"
    (out / ".staging").unlink()

    other = tmp_path / "other"
    other.mkdir()
    (other / "runs").symlink_to("../scratch")
    assert generate(tmp_path, other) == 2
    assert "runs must be a plain folder, and it is a symlink" in capsys.readouterr().err
    (other / "runs").unlink()
    (other / "runs").write_text("a file")
    assert generate(tmp_path, other) == 2
    assert "it is a file" in capsys.readouterr().err
    assert sorted(p.name for p in scratch.rglob("*")) == ["keep.txt", "sub"]


# ---- 2 and 9. a full disk, a read-only folder: the record stays whole -----------------

@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True).returncode:
        pytest.skip("this test mounts a tmpfs, which needs root and mount(8)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_or_a_read_only_folder_leaves_the_record_whole(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        assert generate(tmp_path, out, "--no_cache") == 0
        record = (out / "manifest.json").read_bytes()
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        assert generate(tmp_path, out, "--no_cache") == 1
        err = capsys.readouterr().err
        assert "the disk is full" in err and "Traceback" not in err
        assert (out / "manifest.json").read_bytes() == record
        json.loads(record)
        filler.unlink()

        # The folder read-only: a bind mount of itself, remounted so.
        subprocess.run(["mount", "--bind", str(out), str(out)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(out)], check=True)
            assert cli_main(["report", str(out)]) == 2
            assert generate(tmp_path, out, "--no_cache") == 2
            err = capsys.readouterr().err
            assert err.count("cannot be written") == 2 and "Traceback" not in err
            assert (out / "manifest.json").read_bytes() == record
        finally:
            subprocess.run(["umount", str(out)], check=False)


# ---- 3. a kill at every step of a commit ----------------------------------------------

_COMMIT_SCRIPT = """
import sys
from codeclm_beam.pipelines.run.commit import OutputFolder
root, run_id, text = sys.argv[1:4]
folder = OutputFolder(root, run_id, "manifest.json")
folder.claim()
folder.check()
folder.write_text("examples/examples-00000-of-00001.jsonl", text)
folder.write_text("report.html", text)
folder.commit({"tool": "test", "run_id": run_id})
folder.release()
"""


def commit_in_a_process(root, run_id, text, kill_at=None):
    env = {**os.environ, KILL_AT_ENV: kill_at or ""}
    return subprocess.run([sys.executable, "-c", _COMMIT_SCRIPT, str(root), run_id, text],
                          env=env, capture_output=True, text=True)


def what_a_reader_sees(root) -> str:
    current = read_committed(str(root))
    texts = {open(current.path(*name.split("/"))).read()
             for name in current.record["files"] if name != "manifest.json"}
    assert len(texts) == 1, f"a mix of runs: {texts}"
    return texts.pop()


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_kill_at_each_commit_step_leaves_the_old_run_or_the_new(tmp_path, step):
    out = tmp_path / "out"
    assert commit_in_a_process(out, "old", "old").returncode == 0
    killed = commit_in_a_process(out, "new", "new", kill_at=step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    seen = what_a_reader_sees(out)
    assert seen == ("old" if COMMIT_STEPS.index(step) < COMMIT_STEPS.index("committed")
                    else "new")
    assert (out / "examples" / "examples-00000-of-00001.jsonl").read_text() == seen
    # The killed run's lock went with its process; the next commit cleans up after it.
    assert commit_in_a_process(out, "next", "next").returncode == 0
    assert what_a_reader_sees(out) == "next"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["next"]


def test_a_generate_killed_after_its_commit_reads_whole_and_resumes_without_paying(
        tmp_path, capsys):
    out = tmp_path / "out"
    models = scripted_models(tmp_path, "strong_wins")
    argv = ["generate", *generate_args(tmp_path, models,
                                       write_seeds(tmp_path / "seeds.jsonl", 3), out,
                                       "--num_metadata", "3", "--num_examples", "3")]
    script = ("import sys; from codeclm_beam.pipelines.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    paid = None
    for step in ("record_written", "committed", "cleaning"):
        killed = subprocess.run([sys.executable, "-c", script, *argv],
                                env={**os.environ, KILL_AT_ENV: step},
                                capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        if paid is None:  # killed before its commit: nothing current, all paid for
            paid = requests(tmp_path)
            assert not (out / "current").exists()
        assert requests(tmp_path) == paid  # resumed from the cache each time
    assert cli_main(["show", str(out)]) == 0  # the run that committed, read whole
    shown = capsys.readouterr().out
    assert any(e["instruction"] in shown for e in read_jsonl(out, "examples"))
    assert cli_main(argv) == 0
    assert requests(tmp_path) == paid  # every answer from the cache
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        os.path.basename(os.readlink(out / "current"))]


# ---- 5. one writer, really: real processes racing ------------------------------------

def _leave_a_dead_claim(root):
    dead = {"run_id": "dead", "pid": 2 ** 22 + 7, "host": socket.gethostname()}
    if root.startswith("gs://"):
        from codeclm_beam.pipelines.run import gcs
        path = root + "/.lock"
        gcs.write_if_generation(path, json.dumps(dead), gcs.generation(path))
    else:
        with open(os.path.join(root, ".lock"), "w") as f:
            json.dump(dead, f)


def _racer(root, index, tries, barrier, results, stale):
    if root.startswith("gs://"):  # anonymous on the emulator, as the `cloud` fixture
        from apache_beam.internal.gcp.auth import _Credentials
        _Credentials._credentials_init, _Credentials._credentials = True, None
    for number in range(tries):
        if stale and index == 0:
            _leave_a_dead_claim(root)
        barrier.wait()
        folder = OutputFolder(root, f"r{number}-{index}", "manifest.json")
        try:
            folder.claim()
            won = True
        except ConfigurationError:
            won = False
        results.put((number, index, won))
        barrier.wait()  # the loser has tried while the winner holds the folder
        if won:
            folder.abandon()
            folder.release()
        barrier.wait()


def race(root, tries, stale):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_racer, args=(root, i, tries, barrier, results,
                                                   stale)) for i in range(2)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * tries)]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    return [sum(won for number, _, won in outcomes if number == n) for n in range(tries)]


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_two_processes_racing_for_a_local_folder_one_writes(tmp_path, stale):
    os.makedirs(tmp_path / "out")
    assert race(str(tmp_path / "out"), 40, stale) == [1] * 40


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_two_processes_racing_for_a_gs_folder_one_writes(cloud, stale):
    root = f"gs://codeclm-test/race-{uuid.uuid4().hex[:8]}"
    assert race(root, 12, stale) == [1] * 12


# ---- 4. a killed launcher's lock on gs:// is taken over without a hand step -----------

_HOLD_SCRIPT = """
import sys, time
from codeclm_beam.pipelines.run.commit import OutputFolder
folder = OutputFolder(sys.argv[1], "killed", "manifest.json")
folder.claim()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_launchers_gs_lock_is_taken_over(cloud, caplog):
    from codeclm_beam.pipelines.run import gcs
    root = f"gs://codeclm-test/lease-{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_SCRIPT, root],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigurationError, match="run killed, process"):
        OutputFolder(root, "r2", "manifest.json").claim()  # alive: refused
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    taker = OutputFolder(root, "r3", "manifest.json")
    taker.claim()  # dead on this host: taken over at once
    assert "its process is gone from this host" in caplog.text
    taker.release()

    # Another host's lock: refused while its lease runs, taken over after it.
    lock = root + "/.lock"
    gcs.write_if_generation(lock, json.dumps({"run_id": "far", "host": "elsewhere",
                                              "pid": 1, "lease_seconds": 2}), 0)
    with pytest.raises(ConfigurationError, match="run far"):
        OutputFolder(root, "r4", "manifest.json").claim()
    time.sleep(2.5)
    late = OutputFolder(root, "r5", "manifest.json")
    late.claim()
    assert "its lease ran out" in caplog.text
    late.write_text("examples/examples-00000-of-00001.jsonl", "{}\n")
    # The far run comes back and takes the lock on its generation: r5 has lost it.
    gcs.write_if_generation(lock, json.dumps({"run_id": "far"}), gcs.generation(lock))
    late._lock._renew_once()
    with pytest.raises(NotCommitted, match="no longer holds the folder's lock"):
        late.commit({"tool": "test"})
    late.release()


# ---- 4 and 8. paths refused before any model call -------------------------------------

def test_a_glob_in_the_folder_name_is_refused_before_any_call(tmp_path, capsys):
    assert generate(tmp_path, tmp_path / "pilot [v2]") == 2
    assert "Beam reads [ ] * ? { } in a path as a pattern" in capsys.readouterr().err
    assert not requests(tmp_path) and not (tmp_path / "pilot [v2]").exists()


# ---- 7. a cache inside the output folder is kept apart --------------------------------

def test_a_cache_dir_inside_the_output_folder_serves_every_rerun(tmp_path):
    out = tmp_path / "out"
    cache = ["--cache_dir", str(out / "my-cache")]
    assert generate(tmp_path, out, *cache) == 0
    paid = requests(tmp_path)
    assert generate(tmp_path, out, *cache) == 0
    assert generate(tmp_path, out, *cache) == 0
    assert requests(tmp_path) == paid


# ---- 5. a run that delivered nothing exits 3 -----------------------------------------

def test_a_run_whose_judge_separated_nothing_exits_3(tmp_path, capsys):
    assert generate(tmp_path, tmp_path / "out", "--max_iterations", "1",
                    judge="tie") == 3
    assert "delivered nothing; the judge kept no candidate" in capsys.readouterr().err


def test_old_layout_folders_are_read_and_never_written(tmp_path, capsys):
    out = tmp_path / "old"
    (out / "examples").mkdir(parents=True)
    (out / "examples" / "examples-00000-of-00001.jsonl").write_text('{"x": 1}\n')
    (out / "manifest.json").write_text(json.dumps({"written_files": [
        "manifest.json", "examples/examples-00000-of-00001.jsonl"]}))
    assert read_committed(str(out)).folder == str(out)
    assert generate(tmp_path, out) == 2
    assert "written by an earlier codeclm-beam" in capsys.readouterr().err
    assert not (out / "runs").exists() and not requests(tmp_path)


def test_the_pointer_is_never_left_half_written(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), uuid.uuid4().hex[:12], "manifest.json")
    folder.claim()
    folder.write_text("examples/examples-00000-of-00001.jsonl", "{}\n")
    folder.commit({"tool": "test"})
    folder.release()
    current = tmp_path / "out" / "current"
    assert current.is_symlink() and os.readlink(current) == f"runs/{folder.run_id}"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".current.")]


# ---- 6. evaluate keeps what it judged before ------------------------------------------

def test_an_evaluate_that_judges_much_less_keeps_the_earlier_results(tmp_path, capsys):
    from tests.scripted_backend import write_scenario
    benchmark = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks",
                             "koala.jsonl")
    out, calls = tmp_path / "eval", str(tmp_path / "calls")

    def evaluate(*extra, **judge):
        return cli_main([
            "evaluate", "--benchmark", benchmark, "--output_dir", str(out),
            "--bootstrap_samples", "10", "--max_failed_share", "1",
            "--strong_model", write_scenario(tmp_path / "s.json", role="strong",
                                             judge="by_instruction", log_dir=calls,
                                             **judge),
            "--candidate_model", write_scenario(tmp_path / "t.json", role="target",
                                                judge="by_instruction", log_dir=calls),
            *extra])
    assert evaluate() == 0
    before = {name: (out / name).read_bytes() for name in ("summary.json", "crr.md")}
    judged = json.loads(before["summary.json"])["judged"]
    assert judged > 0
    # A judge whose every answer is refused: nothing judged, the earlier results kept.
    assert evaluate("--no_cache", fail_when="[The Start of Assistant 1") == 3
    err = capsys.readouterr().err
    assert f"the run made 0 judgements; the previous run's {judged}" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert evaluate("--no_cache", "--replace_with_fewer",
                    fail_when="[The Start of Assistant 1") == 0
    assert json.loads((out / "summary.json").read_text())["judged"] == 0
