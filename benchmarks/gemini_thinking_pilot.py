"""Tokens and cost of a 1,000-pair `generate` run at several Gemini thinking settings,
against the loopback Vertex AI server (`fake_model_server.py`), for docs/models.md,
"Choosing Gemini models".

The server thinks as Google documents the families (ranges, defaults, thoughts counted
against the output limit), but how many thought tokens a request spends is drawn from
fixed spans (`THINKING_SPAN`), not measured on Gemini: the figures show what each
setting does to the bill's shape, not what Gemini itself will spend.

    .venv/bin/python benchmarks/gemini_thinking_pilot.py [--num_examples 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402
from codeclm_beam.pipelines.generate import run  # noqa: E402
from codeclm_beam.pipelines.report.figures import estimated_cost  # noqa: E402
from codeclm_beam.pricing import merged_prices  # noqa: E402

SETTINGS = {
    "2.5 Pro + Flash-Lite, defaults": (
        "gemini-2.5-pro", "gemini-2.5-flash-lite", []),
    "2.5 Pro + Flash-Lite, all dynamic": (
        "gemini-2.5-pro", "gemini-2.5-flash-lite",
        ["--strong_thinking", "dynamic", "--judge_thinking", "dynamic",
         "--target_thinking", "dynamic"]),
    "2.5 Pro + Flash-Lite, strong capped at 1024": (
        "gemini-2.5-pro", "gemini-2.5-flash-lite", ["--strong_thinking", "1024"]),
    "3 Pro + 3 Flash, defaults": (
        "gemini-3-pro-preview", "gemini-3-flash-preview", []),
}


def one_run(name, strong, target, flags, num_examples, workdir):
    os.environ.setdefault("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    with FakeModelServer(ServerConfig(accept_rate=0.5, strong_model=strong,
                                      max_seconds=3600)) as server:
        started = time.time()
        manifest = run(argv=[
            "--seeds", os.path.join(ROOT, "examples", "seeds.jsonl"),
            "--output_dir", os.path.join(workdir, name.replace(" ", "_")),
            "--strong_model", f"vertex:{strong}", "--target_model", f"vertex:{target}",
            "--model_base_url", server.base_url, "--vertex_project", "pilot",
            "--num_examples", str(num_examples), "--max_concurrency", "16",
            "--no_report", "--no_cache", *flags])
        by_stage = manifest["model_calls"]["by_stage"]
        _, cost = estimated_cost(by_stage, merged_prices())
        return {
            "setting": name, "pairs": manifest["accounting"]["candidates"][
                "examples_written"],
            "seconds": round(time.time() - started, 1),
            "requests": manifest["model_calls"]["totals"]["requests"],
            "stages": {stage: {kind: sum(m[kind] for m in entry["models"].values())
                               for kind in ("prompt_tokens", "completion_tokens",
                                            "thoughts_tokens")}
                       for stage, entry in by_stage.items()},
            "cost_usd": round(cost, 2),
            "server_usage": dict(server.usage),
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--only", default=None, help="Run one setting by name.")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "gemini_thinking.json"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, (strong, target, flags) in SETTINGS.items():
            if args.only and args.only != name:
                continue
            result = one_run(name, strong, target, flags, args.num_examples, workdir)
            print(json.dumps(result), flush=True)
            results.append(result)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
