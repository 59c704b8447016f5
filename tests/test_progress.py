"""Live progress of a local run: lines while it works, the same figures as the manifest
at the end, nothing with --quiet, and no effect on outputs or calls."""
import re

from tests.helpers import calls_by_kind
from tests.helpers import generate_args
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import write_seeds


def test_a_local_run_shows_its_stages_while_it_works_and_quiet_silences_it(
        tmp_path, capfd):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    # Slow enough calls (0.3 s each, one at a time) that the display sees stages change.
    models = scripted_models(tmp_path, judge="strong_wins", latency_s=0.3)
    args = generate_args(tmp_path, models, seeds, tmp_path / "out", "--num_examples", "2",
                         "--num_metadata", "2", "--max_iterations", "2",
                         "--max_concurrency", "1")
    manifest = run_generate(args)
    lines = [line for line in capfd.readouterr().err.splitlines()
             if re.match(r"^(done )?\[\d+m\d\ds\]", line)]
    assert len(lines) >= 3, lines
    # Stages appear as the run reaches them, in the method's order.
    seen = [stage for stage in ("encode", "rubrics", "decode", "answer_strong", "judge")
            if any(f"{stage}:" in line for line in lines)]
    assert "encode" in seen and "judge" in seen, lines
    # The last line's figures are the manifest's.
    final = lines[-1]
    assert final.startswith("done ")
    totals = manifest["model_calls"]["totals"]
    assert f"kept {manifest['accounting']['candidates']['kept']}/2" in final
    calls = int(re.search(r"calls (\d+)", final).group(1))
    assert calls == totals["elements"] == sum(calls_by_kind(tmp_path).values())
    projected = int(re.search(r"calls \d+ of ~(\d+)", final).group(1))
    assert projected == calls  # once the run is over, the projection is what happened

    # --quiet: no progress, the same outputs, and every answer from the cache.
    quiet = run_generate(args + ["--quiet"])
    assert not re.search(r"\[\d+m\d\ds\]", capfd.readouterr().err)
    assert quiet["accounting"] == manifest["accounting"]
    assert quiet["model_calls"]["totals"]["cache_hits"] == totals["elements"]


def test_the_line_names_every_stage_at_work_and_its_eta_follows_the_recent_pace():
    from codeclm_beam import metrics
    from codeclm_beam.metrics import RunCounters
    from codeclm_beam.pipelines.run.progress import LiveProgress
    from codeclm_beam.pipelines.run.progress import Snapshot
    from codeclm_beam.pipelines.run.progress import describe

    def counters(answered, judged):
        return RunCounters.from_pairs([
            ((metrics.FLOW, metrics.in_round(2, "candidates")), 4),
            ((metrics.model_namespace("answer_strong", "m"), "elements"), answered),
            ((metrics.model_namespace("judge", "m"), "elements"), judged)])
    now = Snapshot(counters(10, 20), {"answer_strong": 3, "judge": 2}, 100.0)
    line = describe(now, 4, 60)
    # Both stages with calls in flight, not only the later one (which may have none
    # done yet while the other advances); the round apart from the run-wide figures.
    assert "| round 2 | answer_strong: 10 done, 3 in flight" in line
    assert "; judge: 20 done, 2 in flight" in line
    assert line.endswith(", ETA ~1m40s")  # 30 calls left at 0.3 a second
    # The ETA follows the pace of the last minute, not of the whole run.
    # A slow first minute (6 calls), then 60 calls in the next: 1 a second, not 0.55.
    progress = LiveProgress(wanted=4, projected_calls=lambda _: 200)
    assert progress.rate(Snapshot(counters(0, 0), {}, 0.0)) is None
    assert progress.rate(Snapshot(counters(2, 4), {}, 60.0)) == 0.1
    assert progress.rate(Snapshot(counters(26, 40), {}, 120.0)) == 1.0
