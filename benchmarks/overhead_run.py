"""The bench's overhead run, shared by every measurement of it (`run.py`'s overhead
step, `startup_phases.py`, `pause_trace.py`): `generate` on N made-up seeds against an
instant loopback server, on the local runner, no cache, no report, as the CLI runs it."""
import json
import os

from codeclm_beam.pipelines import generate


def run_generate(server, folder: str, seeds: int) -> None:
    """One `generate` run of `seeds` seeds (and as many basic instructions and pairs
    asked) against `server`, its files under `folder`."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "seeds.jsonl")
    with open(path, "w") as f:
        for i in range(seeds):
            f.write(json.dumps({"instruction": f"Seed instruction {i} about topic {i % 7}"})
                    + "\n")
    generate.run(["--seeds", path, "--output_dir", os.path.join(folder, "out"),
                  "--no_cache", "--no_report", "--quiet",
                  "--strong_model", f"openai:strong@{server.base_url}/v1",
                  "--target_model", f"openai:target@{server.base_url}/v1",
                  "--num_metadata", "20", "--num_instructions", str(seeds),
                  "--num_examples", str(seeds), "--max_concurrency", "16"],
                 lean=True)  # as the CLI runs it (`--beams_own` turns the swaps off)
