"""Where the pauses of the bench's overhead run go: each stretch of 50 ms or more
without a request (as `make bench` counts them), with what ran in it.

    python benchmarks/pause_trace.py [--seeds 100] [--beams_own]

For each pause it lists the FnApiRunner bundles that overlap it (the time Beam took to
build the bundle's processor, then to run it, and the first and last transform of the
fused stage), the model batches that ended or began in it, and Python's full (gen-2)
garbage collections in it. Times are seconds from the run's start. `--beams_own` runs
with Beam's own DoFn introspection, state sampler, side-input sizing and worker
pickling instead of the lean run's (`pipelines/run/lean.py`), for side-by-side figures.
"""
import argparse
import gc
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apache_beam.runners.portability.fn_api_runner import fn_runner  # noqa: E402
from apache_beam.runners.worker import bundle_processor  # noqa: E402

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402
from benchmarks.overhead_run import run_generate  # noqa: E402
from codeclm_beam.model import handler  # noqa: E402
from codeclm_beam.pipelines.run import lean  # noqa: E402

PAUSE_S = 0.05


def wrap(owner, name: str, record) -> None:
    """owner.name, calling record(self, args, started, ended) after each call."""
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        started = time.time()
        try:
            return original(self, *args, **kwargs)
        finally:
            record(self, args, started, time.time())
    setattr(owner, name, wrapper)


def transforms_of(stage_name: str) -> str:
    names = re.findall(r"ref_AppliedPTransform_(.+?)_\d+\)", stage_name) or [stage_name]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--beams_own", action="store_true")
    args = parser.parse_args()
    if args.beams_own:
        lean.VERIFIED_BEAM = "(none: Beam's own, for the comparison)"
    bundles, builds, batches, collections = [], [], [], []
    wrap(fn_runner.FnApiRunner, "_execute_bundle", lambda _, a, s, e: bundles.append(
        (s, e, transforms_of(a[1].stage.name))))
    wrap(bundle_processor.BundleProcessor, "__init__",
         lambda _, a, s, e: builds.append((s, e)))
    wrap(handler.CodecLMModelHandler, "request", lambda h, a, s, e: batches.append(
        (s, e, f"{h._stage} x{len(a[0])}")))
    full_since = []

    def on_collection(phase, info):
        if info["generation"] == 2:
            if phase == "start":
                full_since.append(time.time())
            else:
                collections.append((full_since.pop(), time.time()))
    gc.callbacks.append(on_collection)

    with tempfile.TemporaryDirectory() as tmp, FakeModelServer(
            ServerConfig(accept_rate=0.7)) as server:
        started = time.time()
        run_generate(server, tmp, args.seeds)
        times = sorted(entry["time"] for entry in server.log)

    pauses = [(a, b) for a, b in zip(times, times[1:]) if b - a >= PAUSE_S]
    before = [(s, e) for s, e in collections if s < times[0]]
    print(f"gen-2 collections before the first request: {len(before)} "
          f"({sum(e - s for s, e in before):.2f} s)")
    print(f"requests {len(times)}; start-up {times[0] - started:.2f} s; window "
          f"{times[-1] - times[0]:.2f} s; paused {sum(b - a for a, b in pauses):.2f} s "
          f"in {len(pauses)}; gen-2 collections {len(collections)} "
          f"({sum(e - s for s, e in collections):.2f} s)")
    for a, b in pauses:
        print(f"\npause {a - started:.3f}-{b - started:.3f} ({1000 * (b - a):.0f} ms)")
        for s, e, name in bundles:
            if e > a and s < b:
                build = sum(be - bs for bs, be in builds if s <= bs < e)
                print(f"  bundle {s - started:7.3f}  build {1000 * build:5.0f} ms  "
                      f"run {1000 * (e - s - build):6.0f} ms  {name[:110]}")
        for s, e, what in batches:
            if a <= e <= b or a <= s <= b:
                print(f"  batch  {s - started:7.3f}-{e - started:.3f}  {what}")
        for s, e in collections:
            if e > a and s < b:
                print(f"  gen-2 collection {s - started:7.3f}  {1000 * (e - s):.0f} ms")


if __name__ == "__main__":
    main()
