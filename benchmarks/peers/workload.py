"""The CodecLM-shaped workload (an answer, a second answer, two judge calls per item)
through a peer library, against a model server; runs in benchmarks/.venv-peers.

    python benchmarks/peers/workload.py --peer distilabel --base_url URL --items 60 --rpm 1200 \
        [--tpm N]

Prints one JSON line: wall seconds and completed items.
"""
import argparse
import json
import os
import tempfile
import time

# No telemetry, no downloads: the bench machine reaches only the local server.
os.environ.setdefault("TELEMETRY_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OPENAI_API_KEY", "not-needed")
os.environ.setdefault("CURATOR_CACHE_DIR", tempfile.mkdtemp())


def judge_prompt(question, first, second):
    return (f"[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{first}\n\n"
            f"[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n"
            f"{second}\n\n[The End of Assistant 2's Answer]\n\nScore both from 1 to 10.")


def shaped_run(ask, strong, target):
    """The workload, given how a peer asks a model for answers to prompts: each
    model's answer, then both judge orders by the strong model; the completed items."""
    def run(questions):
        a = ask(strong, questions)
        b = ask(target, questions)
        judged = ask(strong, [judge_prompt(q, x, y) for q, x, y in zip(questions, a, b)]
                     + [judge_prompt(q, y, x) for q, x, y in zip(questions, a, b)])
        return sum(1 for x in judged[:len(questions)] if x)
    return run


def distilabel_setup(base_url, rpm, tpm):
    """The strong and target models' clients, made before the clock starts (as the
    other side's are); then the run."""
    from distilabel.models import OpenAILLM

    def llm(model):
        # distilabel has no request-rate limit: it relies on the client's retries.
        instance = OpenAILLM(model=model, base_url=base_url, api_key="not-needed",
                             max_retries=10, timeout=60)
        instance.load()
        return instance

    strong, target = llm("strong"), llm("target")

    def generate(model, prompts):
        out = model.generate(inputs=[[{"role": "user", "content": p}] for p in prompts],
                             num_generations=1)
        return [o["generations"][0] for o in out]

    return shaped_run(generate, strong, target)


def curator_setup(base_url, rpm, tpm):
    """The strong and target models' LLMs, made before the clock starts; then the run."""
    from bespokelabs import curator

    class Ask(curator.LLM):
        def prompt(self, row):
            return row["prompt"]

        def parse(self, row, response):
            return {**row, "answer": response}

    strong, target = (Ask(model_name=model, backend="openai", backend_params={
        "base_url": base_url, "api_key": "not-needed",
        "max_requests_per_minute": rpm, "max_tokens_per_minute": tpm or 100_000_000,
        "require_all_responses": False}) for model in ("strong", "target"))

    def ask(llm, prompts):
        result = llm([{"prompt": p, "i": i} for i, p in enumerate(prompts)])
        rows = sorted(result.dataset if hasattr(result, "dataset") else result,
                      key=lambda r: r["i"])
        return [r["answer"] for r in rows]

    return shaped_run(ask, strong, target)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", choices=("distilabel", "curator"), required=True)
    parser.add_argument("--base_url", required=True)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--tpm", type=float, default=None)
    args = parser.parse_args()
    questions = [f"Question number {i}: explain topic {i}." for i in range(args.items)]
    # Imported and set up before the clock starts, as the other side's are.
    run = (distilabel_setup if args.peer == "distilabel" else curator_setup)(
        args.base_url, args.rpm, args.tpm)
    started = time.monotonic()
    completed = run(questions)
    print(json.dumps({"peer": args.peer, "wall_s": round(time.monotonic() - started, 2),
                      "completed_items": completed}))


if __name__ == "__main__":
    main()
