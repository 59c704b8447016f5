"""The CodecLM-shaped workload through this project's model layer, in its own process
as the peers' run in theirs (benchmarks/peers/workload.py), against a model server:
an answer from each model (the strong and the target, two model identities, as in the
method and in the peers' run), then two judge calls per item (the strong model) that
read both answers.

    python benchmarks/codeclm_workload.py --base_url URL --items 60 --rpm 1200 \
        [--sequential | --pipeline] [--tpm N] [--max_concurrency N]

`--pipeline` runs it as the product does, through the `ContrastiveFilter` stage in a
Beam pipeline on the local runner (each answer passed on as it arrives).

Prints one JSON line: wall seconds from the first request to the last answer, CPU
milliseconds of this process per call, and the elements that failed.
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codeclm_beam.model import ChatMessage  # noqa: E402
from codeclm_beam.model import GenerationSettings  # noqa: E402
from codeclm_beam.model import ModelClient  # noqa: E402
from codeclm_beam.model import ModelConfig  # noqa: E402
from codeclm_beam.model import ModelRequest  # noqa: E402
from codeclm_beam.model import QuotaConfig  # noqa: E402
from codeclm_beam.transforms.judge import judge_answer  # noqa: E402
from codeclm_beam.transforms.judge import pairwise_judge_prompt  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base_url", required=True)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--tpm", type=float, default=None)
    parser.add_argument("--max_concurrency", type=int, default=None)
    parser.add_argument("--sequential", action="store_true",
                        help="One request at a time, in a plain loop (the baseline).")
    parser.add_argument("--pipeline", action="store_true",
                        help="Through ContrastiveFilter in a Beam pipeline.")
    args = parser.parse_args()
    # The product's defaults (adaptive concurrency), with the quota given.
    strong, target = (ModelConfig(uri=f"openai:{model}@{args.base_url}",
                                  quota=QuotaConfig(requests_per_minute=args.rpm,
                                                    tokens_per_minute=args.tpm,
                                                    run_id=f"shaped{os.getpid()}"))
                      for model in ("strong", "target"))
    if args.max_concurrency:
        strong, target = (c.replace(max_concurrency=args.max_concurrency)
                          for c in (strong, target))
    questions = [f"Question number {i}: explain topic {i}." for i in range(args.items)]
    if args.pipeline:
        return through_the_pipeline(strong, target, questions)
    if args.sequential:
        strong, target = (c.replace(concurrency="fixed", max_concurrency=1)
                          for c in (strong, target))
    strong, target = ModelClient(strong), ModelClient(target)

    def ask(client, work):
        return ([client.call(r) for r in work] if args.sequential
                else client.call_all(work))
    judge_schema = judge_answer(10).request_schema()  # the filter's judgement
    started, cpu = time.monotonic(), time.process_time()
    asked = {side: [ModelRequest.create(f"{side}{i}", [ChatMessage("user", q)],
                                        GenerationSettings(0.7, 256, seed=i))
                    for i, q in enumerate(questions)] for side in ("a", "b")}
    if args.sequential:
        answers = ask(strong, asked["a"]) + ask(target, asked["b"])
    else:
        # Both answers at once, each model under its own limit; then the judgements.
        with ThreadPoolExecutor(2) as both:
            a, b = both.submit(ask, strong, asked["a"]), both.submit(ask, target, asked["b"])
            answers = a.result() + b.result()
    texts = [getattr(a, "text", "") for a in answers]
    judgements = ask(strong, [
        ModelRequest.create(f"j{order}{i}", pairwise_judge_prompt(
            q, *((x, y) if order == 0 else (y, x)), 10),
            GenerationSettings(0.0, 64, seed=i), judge_schema)
        for order in (0, 1)
        for i, (q, x, y) in enumerate(zip(questions, texts[:args.items],
                                          texts[args.items:]))])
    wall, cpu = time.monotonic() - started, time.process_time() - cpu
    results = answers + judgements
    calls = sum(getattr(r, "stats").attempts for r in results)
    print(json.dumps({"wall_s": round(wall, 2),
                      "cpu_ms_per_call": round(1000 * cpu / max(calls, 1), 2),
                      "failed": sum(1 for r in results if hasattr(r, "error_class")),
                      "concurrency_limit": strong.in_flight.limit}))


def through_the_pipeline(strong: ModelConfig, target: ModelConfig, questions) -> None:
    import apache_beam as beam

    from codeclm_beam.records import Candidate
    from codeclm_beam.transforms import ContrastiveFilter
    started, cpu = time.monotonic(), time.process_time()
    with beam.Pipeline(runner="FnApiRunner") as p:
        filtered = (p | beam.Create(questions) | beam.Map(Candidate.of)
                    | ContrastiveFilter(strong, target, judge=strong, threshold=3))
        (filtered.kept, filtered.undecided) | beam.Flatten() | beam.combiners.Count.Globally()
    print(json.dumps({"wall_s": round(time.monotonic() - started, 2),
                      "cpu_s": round(time.process_time() - cpu, 2), "failed": 0}))


if __name__ == "__main__":
    main()
