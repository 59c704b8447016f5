"""Shared helpers for pipeline tests: scripted models, running `generate`, reading
outputs."""
from __future__ import annotations

import glob
import json
import os

from codeclm_beam.pipelines.generate import run
from tests.scripted_backend import read_calls
from tests.scripted_backend import write_scenario

TOPICS = ["python", "poem", "email", "budget", "story", "sql", "recipe", "travel",
          "physics", "marketing", "history", "fitness"]


def write_seeds(path, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"{TOPICS[i % len(TOPICS)]} request "
                                               f"number{i} with details"}) + "\n")
    return str(path)


def scripted_models(tmp_path, judge: str, per_role: dict | None = None,
                    **scenario) -> dict[str, str]:
    """URIs of scripted strong, target and judge models; `per_role` adds scenario
    keys to one role (e.g. {"strong": {"fail_when": "poem"}})."""
    log_dir = str(tmp_path / "calls")
    per_role = per_role or {}
    return {role: write_scenario(tmp_path / f"{role}.json", role=role, judge=judge,
                                 log_dir=log_dir, **scenario, **per_role.get(role, {}))
            for role in ("strong", "target", "judge")}


def generate_args(tmp_path, models, seeds, output_dir, *extra) -> list[str]:
    return ["--seeds", seeds, "--output_dir", str(output_dir),
            "--strong_model", models["strong"], "--target_model", models["target"],
            "--judge_model", models["judge"], *extra]


def run_generate(argv):
    return run(argv=argv)


def read_jsonl(output_dir, name) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(str(output_dir), name, "*.jsonl"))):
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def calls_by_kind(tmp_path) -> dict[str, int]:
    counts: dict[str, int] = {}
    log_dir = tmp_path / "calls"
    if not log_dir.exists():
        return counts
    for call in read_calls(log_dir):
        kind = call["kind"]
        if kind == "answer":
            kind = f"answer_{call['role']}"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def stage_requests(manifest) -> dict[str, int]:
    """Backend requests per stage, from the run's Beam metrics."""
    return {stage: sum(m["requests"] for m in entry["models"].values())
            for stage, entry in manifest["model_calls"]["by_stage"].items()}


# Elements gathered by `collect`: a module attribute, so the runner's pickled functions
# reach this very list (in-process runners only).
COLLECTED: dict[str, list] = {}


def _gather(element, name):
    COLLECTED.setdefault(name, []).append(element)


def collect(build, options=None) -> dict[str, list]:
    """Runs the pipeline `build(pipeline)` makes, in process, and returns the elements of
    each PCollection it returns by name ({name: PCollection})."""
    return _run_collecting(build, options)[0]


def collect_counting(build, namespace: str, options=None) -> tuple[dict[str, list],
                                                                   dict[str, int]]:
    """`collect`, and the run's committed counters of one namespace {name: value}."""
    from apache_beam.metrics.metric import MetricsFilter
    collected, result = _run_collecting(build, options)
    return collected, {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(namespace))["counters"]}


def _run_collecting(build, options):
    import apache_beam as beam
    COLLECTED.clear()
    pipeline = beam.Pipeline(options=options)
    for name, pcoll in build(pipeline).items():
        pcoll | f"Collect{name}" >> beam.Map(_gather, name)
    result = pipeline.run()
    result.wait_until_finish()
    return {name: list(values) for name, values in COLLECTED.items()}, result


# Beam looks for Application Default Credentials before it talks to Cloud Storage,
# retrying for about 30 s when there are none; the emulator takes anonymous calls, so
# a child run the tests start goes straight to anonymous, as Beam would end
# (`python -c ANONYMOUS_GCS COMMAND ARGS...`; the `cloud` fixture does it in process).
ANONYMOUS_GCS = ("from apache_beam.internal.gcp.auth import _Credentials; "
                 "_Credentials._credentials_init = True; import sys; "
                 "from codeclm_beam.pipelines.cli import main; sys.exit(main())")
