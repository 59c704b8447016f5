"""Where `generate`'s start-up goes, phase by phase, without a profiler: the bench's
overhead run (30 seeds against the instant loopback server), each phase timed by
wrapping the function that does it.

    python benchmarks/startup_phases.py [--runs 3]

Prints one JSON line per run: seconds in the preflight checks, in building the graph,
in Beam's conversion of it for the runner, until the first request, and the graph's
leaf transforms.

`--memoize_beam_introspection` measures what Beam's own DoFn introspection costs:
it keeps `userstate.get_dofn_specs`'s answer per DoFn class (and the bound methods an
instance carries), which Beam 2.77 recomputes from `inspect.signature` of every method
of a DoFn twice per ParDo while building, four times while converting, and again in
every bundle processor. An experiment for this measurement only: the product does not
patch Beam (apache/beam#9925 proposed the same memo upstream).
"""
import argparse
import functools
import json
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402
from codeclm_beam.pipelines import generate  # noqa: E402


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
        seeds = os.path.join(tmp, "seeds.jsonl")
        with open(seeds, "w") as f:
            for i in range(30):
                f.write(json.dumps({"instruction": f"Seed instruction {i} about topic {i % 7}"})
                        + "\n")
        phases.clear()
        started = time.monotonic()
        wall_started = time.time()
        generate.run(["--seeds", seeds, "--output_dir", os.path.join(tmp, "out"),
                      "--no_cache", "--no_report", "--quiet",
                      "--strong_model", f"openai:strong@{server.base_url}/v1",
                      "--target_model", f"openai:target@{server.base_url}/v1",
                      "--num_metadata", "20", "--num_instructions", "30",
                      "--num_examples", "30", "--max_concurrency", "16"])
        first_request = min(entry["time"] for entry in server.log) - wall_started
    leaves = sum(1 for t in graphs[-1].components.transforms.values() if not t.subtransforms)
    return {**{k: round(v, 2) for k, v in phases.items()},
            "until_first_request_s": round(first_request, 2),
            "after_conversion_until_first_request_s": round(
                first_request - sum(phases.values()), 2),
            "whole_run_s": round(time.monotonic() - started, 2),
            "leaf_transforms": leaves}


def memoize_beam_introspection() -> None:
    from apache_beam.transforms import userstate
    computed, answers = userstate.get_dofn_specs, {}

    def get_dofn_specs(dofn):
        # Methods an instance carries (a Map's process may be a bound method) are
        # part of the key; the rest of the answer is the class's.
        bound = tuple(sorted((name, value.__func__) for name, value in vars(dofn).items()
                             if isinstance(value, types.MethodType)))
        key = (type(dofn), bound)
        if key not in answers:
            answers[key] = computed(dofn)
        states, timers = answers[key]
        return set(states), set(timers)
    userstate.get_dofn_specs = get_dofn_specs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memoize_beam_introspection", action="store_true")
    args = parser.parse_args()
    if args.memoize_beam_introspection:
        memoize_beam_introspection()
    phases, graphs = {}, []
    timed(generate, "preflight", phases, "preflight_s")
    timed(generate, "build_pipeline", phases, "build_s")
    timed(beam.Pipeline, "to_runner_api", phases, "to_runner_api_s", graphs.append)
    for _ in range(args.runs):
        print(json.dumps(one_run(phases, graphs)), flush=True)


if __name__ == "__main__":
    main()
