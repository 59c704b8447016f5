"""Where `generate`'s start-up goes, phase by phase, without a profiler: the bench's
overhead run (30 seeds against the instant loopback server), each phase timed by
wrapping the function that does it.

    python benchmarks/startup_phases.py [--runs 3]

Prints one JSON line per run: seconds in the preflight checks, in building the graph,
in Beam's conversion of it for the runner, until the first request, and the graph's
leaf transforms.

`--beams_own` runs with Beam's own DoFn introspection, state sampler, side-input
sizing and worker pickling instead of the lean run's (`pipelines/run/lean.py`), for the side-by-side
figures in docs/performance.md.
"""
import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402
from benchmarks.overhead_run import run_generate  # noqa: E402
from codeclm_beam.pipelines import generate  # noqa: E402
from codeclm_beam.pipelines.run import lean  # noqa: E402


def timed(owner, name: str, phases: dict, label: str, keep=None) -> None:
    """Wraps owner.name so each call adds its wall seconds to phases[label]."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.monotonic()
        result = original(*args, **kwargs)
        phases[label] = phases.get(label, 0.0) + time.monotonic() - started
        if keep is not None:
            keep(result)
        return result
    setattr(owner, name, wrapper)


def one_run(phases: dict, graphs: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp, FakeModelServer(
            ServerConfig(accept_rate=0.7)) as server:
        phases.clear()
        started = time.monotonic()
        wall_started = time.time()
        run_generate(server, tmp, seeds=30)
        first_request = min(entry["time"] for entry in server.log) - wall_started
    leaves = sum(1 for t in graphs[-1].components.transforms.values() if not t.subtransforms)
    return {**{k: round(v, 2) for k, v in phases.items()},
            "until_first_request_s": round(first_request, 2),
            "after_conversion_until_first_request_s": round(
                first_request - sum(phases.values()), 2),
            "whole_run_s": round(time.monotonic() - started, 2),
            "leaf_transforms": leaves}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--beams_own", action="store_true")
    args = parser.parse_args()
    if args.beams_own:
        lean.VERIFIED_BEAM = "(none: Beam's own, for the comparison)"
    phases, graphs = {}, []
    timed(generate, "preflight", phases, "preflight_s")
    timed(generate, "build_pipeline", phases, "build_s")
    timed(beam.Pipeline, "to_runner_api", phases, "to_runner_api_s", graphs.append)
    for _ in range(args.runs):
        print(json.dumps(one_run(phases, graphs)), flush=True)


if __name__ == "__main__":
    main()
