"""The same `generate` run at growing sizes (10^3, 10^4, 10^5 pairs asked) against an
instant loopback server, on the DirectRunner in multi-processing mode (2 worker
processes): CPU milliseconds per model call, peak memory per process (the launcher
and the largest worker apart) and wall time per pair, with the growth from the
smallest size to the largest. Each size runs in a fresh process, so its peaks are its
own.

    python benchmarks/scale_curve.py [--sizes 1000,10000,100000]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir  # noqa: E402

LEXICON = 50_000

# Run in the child: generate, then its own and its workers' resource use (peaks from
# VmHWM: benchmarks/peak_memory.py says why not getrusage's).
_CHILD = """
import json, resource, sys
from benchmarks.peak_memory import DescendantsPeak, high_water_mb
from codeclm_beam.pipelines.generate import run
with DescendantsPeak() as workers_peak:
    manifest = run(sys.argv[1:])
me, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                   resource.RUSAGE_CHILDREN))
accounting = manifest["accounting"]
print(json.dumps({
    "requests": manifest["model_calls"]["totals"]["requests"],
    "kept": accounting["candidates"]["kept"],
    # What a point that strays from the call formula is checked by: the manifest's
    # own balance, and each round's candidates and kept pairs.
    "balanced": accounting["balanced"],
    "pool_entries": accounting["metadata_pool"]["entries"],
    "reference_buckets": accounting["screening"]["reference_buckets"],
    "rounds": [[r["candidates"], r["kept"]] for r in accounting["candidates"]["rounds"]
               if r["candidates"]],
    "cpu_s": me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime,
    "launcher_peak_mb": high_water_mb(), "worker_peak_mb": workers_peak.largest_mb,
    "processes": len(workers_peak.peaks)}))
"""


def point(server: FakeModelServer, pairs: int, folder: str) -> dict[str, Any]:
    seeds = os.path.join(folder, "seeds.jsonl")
    with open(seeds, "w") as f:
        for i in range(max(10, pairs // 10)):
            f.write(json.dumps({"instruction": f"Seed {i}: explain idea {i} of area "
                                               f"{i % 13}."}) + "\n")
    started, logged = time.monotonic(), len(server.log)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, "--seeds", seeds,
         "--output_dir", os.path.join(folder, "out"), "--no_cache", "--no_report",
         "--quiet", "--max_seeds", "all",
         "--strong_model", f"openai:strong@{server.base_url}/v1",
         "--target_model", f"openai:target@{server.base_url}/v1",
         "--num_examples", str(pairs), "--max_concurrency", "32",
         "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=4 * 3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    wall = time.monotonic() - started
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Why calls failed for good, read before the temporary folder goes: a point that
    # strays from the formula says so with its reasons, not only its counts.
    reasons = collections.Counter(
        f"{letter['stage']}: {letter['reason']} ({letter['error_class']})"
        for letter in read_jsonl_dir(os.path.join(folder, "out", "dead_letter")))
    return {"pairs": pairs, "kept": report["kept"], "requests": report["requests"],
            "server_requests": len(server.log) - logged, "balanced": report["balanced"],
            "pool_entries": report["pool_entries"], "rounds": report["rounds"],
            "reference_buckets": report["reference_buckets"],
            "cpu_ms_per_call": round(1000 * report["cpu_s"] / report["requests"], 2),
            "launcher_peak_mb": round(report["launcher_peak_mb"], 1),
            "worker_peak_mb": round(report["worker_peak_mb"], 1),
            "processes_started": report["processes"],
            "dead_letters": dict(reasons.most_common()),
            "wall_ms_per_pair": round(1000 * wall / pairs, 2), "wall_s": round(wall, 1)}


def scale_curve(sizes: list[int]) -> dict[str, Any]:
    points = []
    # Every answer judged a clear win: one round, every pair asked kept; texts from a
    # lexicon large enough that 10^5 instructions do not repeat one another.
    with FakeModelServer(ServerConfig(accept_rate=1.0, lexicon=LEXICON)) as server:
        for pairs in sizes:
            with tempfile.TemporaryDirectory() as folder:
                points.append(point(server, pairs, folder))
                print(json.dumps(points[-1]), flush=True)
    first, last = points[0], points[-1]
    growth = {key: round(last[key] / first[key], 3) for key in
              ("cpu_ms_per_call", "launcher_peak_mb", "worker_peak_mb", "wall_ms_per_pair")}
    return {"points": points, "growth_smallest_to_largest": growth}


def plot(curve: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = curve["points"]
    sizes = [p["pairs"] for p in points]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for axis, keys, title in (
            (axes[0], ("cpu_ms_per_call",), "CPU ms per model call"),
            (axes[1], ("launcher_peak_mb", "worker_peak_mb"), "peak memory per process, MB"),
            (axes[2], ("wall_ms_per_pair",), "wall ms per pair")):
        for key in keys:
            axis.plot(sizes, [p[key] for p in points], marker="o", label=key)
        axis.set_xscale("log")
        axis.set_ylim(bottom=0)
        axis.set_xlabel("pairs asked")
        axis.set_title(title)
        if len(keys) > 1:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    curve = scale_curve([int(s) for s in args.sizes.split(",")])
    print(json.dumps(curve["growth_smallest_to_largest"]))


if __name__ == "__main__":
    main()
