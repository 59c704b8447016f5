"""`make bench`: side-by-side measurements in one run, written to
benchmarks/results/latest.json and benchmarks/results/latest.md.

Every figure is a ratio measured in this run against a baseline measured in the same
run on the same machine, so the numbers travel between machines better than seconds do.
BENCH_SCALE (default 1.0) scales the request counts; CI does not run this.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.dedup import dedup  # noqa: E402
from benchmarks.decontamination import measure as decontamination  # noqa: E402
from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402
from benchmarks.realistic import run_side  # noqa: E402
from codeclm_beam.model import ChatMessage  # noqa: E402
from codeclm_beam.model import GenerationSettings  # noqa: E402
from codeclm_beam.model import ModelClient  # noqa: E402
from codeclm_beam.model import ModelConfig  # noqa: E402
from codeclm_beam.model import ModelRequest  # noqa: E402
from codeclm_beam.model import QuotaConfig  # noqa: E402

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def requests(n: int, tag: str, schema=None) -> list[ModelRequest]:
    return [ModelRequest.create(f"{tag}{i}", [ChatMessage("user", f"Question {tag} {i}?")],
                                GenerationSettings(0.7, 256, seed=i), schema)
            for i in range(n)]


def quota_use() -> dict[str, Any]:
    """N requests through the model layer against a server enforcing Q RPM."""
    quota_rpm, latency = 600, 0.3
    n = int(700 * SCALE)
    with FakeModelServer(ServerConfig(rpm=quota_rpm, latency_mean=latency)) as server:
        client = ModelClient(ModelConfig(
            uri=f"openai:strong@{server.base_url}/v1", max_concurrency=16,
            quota=QuotaConfig(requests_per_minute=quota_rpm, run_id=f"bench{os.getpid()}")))
        started = time.monotonic()
        results = client.call_all(requests(n, "quota"))
        wall = time.monotonic() - started
        outcomes = server.outcomes()
    sent = sum(outcomes.values())
    # A minute's quota goes out as fast as the concurrency allows, then each later
    # minute's: the whole minutes waited, plus the last part at the concurrency's pace.
    pace = 16 / latency
    full_minutes = (n - 1) // quota_rpm
    ideal = 60 * full_minutes + (n - full_minutes * quota_rpm) / pace + latency
    return {"requests": n, "quota_rpm": quota_rpm, "latency_s": latency,
            "achieved_rpm_over_quota": round(60 * n / wall / quota_rpm, 3),
            "share_429": round(outcomes.get("throttled", 0) / sent, 4),
            "wall_over_ideal": round(wall / ideal, 3),
            "answered": sum(1 for r in results if not hasattr(r, "error_class"))}


def codeclm_shaped() -> dict[str, Any]:
    """An answer from each model, then two judge calls per item that read both answers
    (the judge waits for them, as in the contrastive filter): this project's model
    layer with its defaults (adaptive concurrency, the quota given) against a plain
    sequential loop and the peers. Every side is a client process of its own against
    the same server in this one; each side's wall runs from its first request to its
    last answer, its imports and set-up left out."""
    quota_rpm, latency, items = 1200, 0.3, int(60 * SCALE)
    out = {}
    for name, side, flags in (("codeclm_beam", "codeclm_beam", ()),
                              ("sequential_loop", "codeclm_beam", ("--sequential",)),
                              ("distilabel", "distilabel", ()), ("curator", "curator", ())):
        with FakeModelServer(ServerConfig(rpm=quota_rpm, latency_mean=latency)) as server:
            result = run_side(side, server, items, quota_rpm, flags=flags, timeout_s=1800)
        if "error" in result:
            out[name] = result
            continue
        done = result.get("completed_items", items)
        out[name] = {"items": items, **result,
                     "requests_per_item": round(result["requests"] / max(done, 1), 3)}
    out["speedup_over_sequential"] = round(out["sequential_loop"]["wall_s"]
                                           / out["codeclm_beam"]["wall_s"], 2)
    return out


def overhead() -> dict[str, Any]:
    """Requests per second through `generate` on the DirectRunner against an instant
    server, versus a bare asyncio client sending as many requests. Like with like: the
    pipeline's start-up (building, the first stages' set-up, until its first request)
    is reported apart, and its rate is measured between its first and last request.

    Three pairs, each a pipeline run then the bare client at once after it (the median
    of three of its runs), and the pair with the median ratio reported: a run of a
    second or two on this VM varies by a third from one to the next (177 to 277 bare
    requests/s measured back to back), and the two sides of a pair see the same VM."""
    from benchmarks.overhead_run import run_generate
    pairs = []
    with tempfile.TemporaryDirectory() as tmp, FakeModelServer(ServerConfig(
            accept_rate=0.7)) as server:
        for pair in range(3):
            logged = len(server.log)
            started, cpu = time.time(), time.process_time()
            run_generate(server, os.path.join(tmp, str(pair)), seeds=int(100 * SCALE))
            finished, cpu = time.time(), time.process_time() - cpu
            times = sorted(entry["time"] for entry in server.log[logged:])
            bare_walls = sorted(_bare_client_wall(server.base_url, len(times))
                                for _ in range(3))
            pairs.append(_overhead_pair(times, started, finished, cpu, bare_walls[1]))
    ratio = "pipeline_steady_over_bare_throughput"
    median = sorted(pairs, key=lambda p: p[ratio])[1]
    return {**median,
            "pairs_steady_over_bare": [p[ratio] for p in pairs],
            "pairs_startup_s": [p["pipeline_startup_s"] for p in pairs],
            "pairs_paused_s": [p["pipeline_paused_s"] for p in pairs]}


def _bare_client_wall(base_url: str, requests: int) -> float:
    """Seconds for a bare asyncio client to send `requests` requests, 16 at a time."""
    bodies = [{"model": "strong", "messages": [
        {"role": "user", "content": f"Question {i}?"}]} for i in range(requests)]

    async def bare():
        import httpx
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as c:
            gate = asyncio.Semaphore(16)

            async def one(body):
                async with gate:
                    r = await c.post("/v1/chat/completions", json=body)
                    r.raise_for_status()
                    r.json()
            await asyncio.gather(*(one(b) for b in bodies))
    started = time.monotonic()
    asyncio.run(bare())
    return time.monotonic() - started


def _overhead_pair(times: list, started: float, finished: float, cpu: float,
                   bare_wall: float) -> dict[str, Any]:
    sent = len(times)
    steady = max(times[-1] - times[0], 1e-6)
    # Between its first and last request, the pipeline is either sending or waiting
    # for stages to finish that the next model stage depends on: a pause with no
    # request at all for 50 ms (the instant server answers in about 1 ms).
    pauses = [b - a for a, b in zip(times, times[1:]) if b - a > 0.05]
    sending = max(steady - sum(pauses), 1e-6)
    return {"requests": sent, "pipeline_wall_s": round(finished - started, 2),
            "pipeline_pauses_between_stages": len(pauses),
            "pipeline_paused_s": round(sum(pauses), 2),
            "pipeline_while_sending_over_bare_throughput": round(bare_wall / sending, 3),
            "pipeline_startup_s": round(times[0] - started, 2),
            "pipeline_after_last_request_s": round(finished - times[-1], 2),
            "pipeline_steady_requests_per_s": round(sent / steady, 1),
            "bare_asyncio_requests_per_s": round(sent / bare_wall, 1),
            "pipeline_steady_over_bare_throughput": round(bare_wall / steady, 3),
            "pipeline_whole_over_bare_throughput": round(bare_wall / (finished - started), 3),
            # This process's CPU over the run (the loopback server's threads included)
            # per request sent.
            "pipeline_cpu_ms_per_call": round(1000 * cpu / max(sent, 1), 2)}


def adaptive() -> dict[str, Any]:
    """Adaptive concurrency against a server whose capacity changes during the run
    (600, then 200, then 900 requests per minute; no quota given to the client): the
    answers per second over the capacity per second, the share of 429s, every element
    answered; and the curve (capacity, concurrency limit, answers/s, 429s) as a plot."""
    from codeclm_beam.model.concurrency import shared_limit
    # A minute per phase whatever BENCH_SCALE: the figure is about time constants (a
    # probe cycle takes 5-15 s), and a shorter phase holds too few cycles to measure.
    phase = 60.0
    schedule = ((0.0, 600.0), (phase, 200.0), (2 * phase, 900.0))
    end = 3 * phase
    # Enough work to keep the client busy to the end of the schedule, not beyond it
    # by much: what the capacity holds, and a tenth more.
    n = int(1.1 * sum(rpm / 60 * phase for _, rpm in schedule))
    with FakeModelServer(ServerConfig(capacity_schedule=schedule, capacity_burst_s=2.0,
                                      latency_mean=1.0, latency_sigma=0.3)) as server:
        config = ModelConfig(uri=f"openai:strong@{server.base_url}/v1",
                             max_concurrency=64, concurrency="adaptive")
        client = ModelClient(config)
        results = client.call_all(requests(n, "adaptive"))
        log, started = list(server.log), server.started_wall
        limit = shared_limit(client.identity, 64, "adaptive")
        history = [(at - limit.history[0][0], value) for at, value in limit.history]
    # The limit's clock is monotonic from its creation, just after the server's start.
    seconds = int(end)
    ok = [0] * seconds
    throttled = [0] * seconds
    for entry in log:
        # Counted when the server admitted it (an answer is logged when it leaves).
        second = int(entry["time"] - (entry["latency"] or 0.0) - started)
        if 0 <= second < seconds:
            (ok if entry["outcome"] == "ok" else throttled)[second] += 1
    capacity = [FakeModelServer.capacity_rpm_of(schedule, s) / 60 for s in range(seconds)]
    sent = len(log)
    figures = {
        "schedule_rpm": [list(p) for p in schedule], "requests": n,
        "answered": sum(1 for r in results if not hasattr(r, "error_class")),
        "lost": sum(1 for r in results if hasattr(r, "error_class")),
        "answers_over_capacity": round(sum(ok) / sum(capacity), 3),
        "share_429": round(sum(1 for e in log if e["outcome"] == "throttled") / sent, 4),
        "by_phase": [round(sum(ok[int(a):int(a + phase)])
                           / (rpm / 60 * phase), 3) for a, rpm in schedule],
        "curve": {"second": list(range(seconds)), "capacity_per_s": capacity,
                  "answers_per_s": ok, "throttled_per_s": throttled,
                  "limit": [[round(t, 2), round(v, 2)] for t, v in history]}}
    figures["plot"] = _plot_adaptive(figures["curve"])
    return figures


def _plot_adaptive(curve: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(RESULTS, "adaptive.png")
    fig, rate = plt.subplots(figsize=(9, 4.2), dpi=110)
    seconds = curve["second"]
    rate.step(seconds, curve["capacity_per_s"], where="post", color="black",
              label="server capacity (requests/s)")
    rate.bar(seconds, curve["answers_per_s"], width=0.9, align="edge", color="#4c8bd6",
             alpha=0.6, label="answers/s")
    rate.bar(seconds, curve["throttled_per_s"], width=0.9, align="edge",
             bottom=curve["answers_per_s"], color="#d64c4c", label="429s/s")
    rate.set_xlabel("seconds")
    rate.set_ylabel("requests per second")
    limit = rate.twinx()
    limit.step([t for t, _ in curve["limit"]], [v for _, v in curve["limit"]],
               where="post", color="#e0a020", label="concurrency limit")
    limit.set_ylabel("requests in flight allowed")
    limit.set_ylim(bottom=0)
    handles = rate.get_legend_handles_labels()
    more = limit.get_legend_handles_labels()
    rate.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left",
                fontsize=8)
    rate.set_title("Adaptive concurrency (AIMD) against a changing capacity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.path.relpath(path, ROOT)


EMBEDDED_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 1, "maxLength": 80},
    "sentences": {"type": "array", "minItems": 2, "maxItems": 2,
                  "items": {"type": "string", "minLength": 1, "maxLength": 300}}},
    "required": ["title", "sentences"], "additionalProperties": False}

# Direct llama-cpp-python calls, in a child process: loaded as the embedded backend loads
# (plain CPU buffers), or as llama.cpp would by default (extra buffer types: the AMX or
# CPU repack path where the CPU has one, which crashes on AMX CPUs).
_DIRECT = r"""
import contextlib, json, sys, time
from llama_cpp import Llama
from codeclm_beam.model.backends import llamacpp
path, prompts, schema_text, threads, n_ctx, load = json.loads(sys.argv[1])
with (llamacpp._weights_in_plain_cpu_buffers() if load == "plain"
      else contextlib.nullcontext()):
    model = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, verbose=False)
grammar = llamacpp._grammar(schema_text)
started, tokens = time.monotonic(), 0
for i, p in enumerate(prompts):
    out = model.create_chat_completion(messages=[{"role": "user", "content": p}],
                                       temperature=0.7, max_tokens=160, seed=i,
                                       grammar=grammar)
    tokens += out["usage"]["completion_tokens"]
print(json.dumps([tokens, tokens / (time.monotonic() - started)]))
"""


def _direct_llama(path, prompts, schema_text, threads, n_ctx, load):
    """(tokens, tokens per second) of direct calls, or why there are none."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", _DIRECT,
             json.dumps([path, prompts, schema_text, threads, n_ctx, load])],
            capture_output=True, text=True, timeout=900, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    if child.returncode:
        return None, f"crashed (exit {child.returncode})"
    tokens, rate = json.loads(child.stdout.strip().splitlines()[-1])
    return tokens, round(rate, 1)


def embedded() -> dict[str, Any]:
    """Generated tokens per second through the model layer in a Beam pipeline versus
    direct llama-cpp-python calls on the same prompts with the same grammar and seeds.
    Both count every token generated (the pipeline re-sends nothing here); the
    pipeline's steady rate runs from the first element reaching RunInference to the
    last answer leaving it (the model loads in the stage's set-up, before), its whole
    rate includes Beam's start-up and the model load."""
    from codeclm_beam.model.uri import ModelSpec

    path = ModelSpec.parse("llamacpp:smollm2-135m").gguf_path()
    prompts = [f"Give a title and two sentences about topic number {i}, as JSON."
               for i in range(int(8 * SCALE))]
    work = [ModelRequest.create(f"e{i}", [ChatMessage("user", p)],
                                GenerationSettings(0.7, 160, seed=i), EMBEDDED_SCHEMA)
            for i, p in enumerate(prompts)]
    threads = os.cpu_count()
    config = ModelConfig(n_threads=threads, max_truncation_retries=0,
                         max_parse_retries=0)
    schema_text = work[0].json_schema_text
    _, default_rate = _direct_llama(path, prompts, schema_text, threads, config.n_ctx,
                                    "default")
    # A 2-vCPU VM's speed drifts by a fifth between runs of a few seconds: direct and
    # pipeline runs alternate, and the ratio is the median of the pairs.
    pairs = []
    for _ in range(EMBEDDED_REPEATS):
        direct_tokens, direct_rate = _direct_llama(path, prompts, schema_text, threads,
                                                   config.n_ctx, "plain")
        pipeline_tokens, steady, whole = _embedded_pipeline(work, config)
        pairs.append((steady / direct_rate, whole / direct_rate, direct_rate, steady,
                      pipeline_tokens == direct_tokens))
    pairs.sort()
    ratio, whole_ratio, direct_rate, steady, same = pairs[len(pairs) // 2]
    return {"prompts": len(prompts), "repeats": len(pairs),
            "direct_tokens_per_s": round(direct_rate, 1),
            "pipeline_steady_tokens_per_s": round(steady, 1),
            "pipeline_over_direct": round(ratio, 3),
            "pipeline_over_direct_all": [round(p[0], 3) for p in pairs],
            "pipeline_whole_over_direct": round(whole_ratio, 3),
            "same_tokens_generated": all(p[4] for p in pairs),
            "llama_cpp_default_load_tokens_per_s": default_rate,
            "note": "same prompts, seeds and grammar; median of alternating pairs; "
                    "steady = first element in to last answer out; whole includes "
                    "Beam start-up and the model load; default load = llama.cpp's "
                    "extra buffer types (AMX or CPU repack where the CPU has them), "
                    "in a child process"}


EMBEDDED_REPEATS = 3


def _embedded_pipeline(work, config) -> tuple[int, float, float]:
    """(tokens, steady tokens/s, whole-run tokens/s) of the requests through
    RunInference on the DirectRunner."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler
    from apache_beam.ml.inference.base import RunInference
    from codeclm_beam.model import CodecLMModelHandler
    with tempfile.TemporaryDirectory() as tmp:
        answers_file = os.path.join(tmp, "answers")
        started = time.monotonic()
        with beam.Pipeline() as p:
            # Each element is stamped as it reaches RunInference and as it leaves it.
            (p | beam.Create(work)
             | "Entered" >> beam.Map(lambda r: (time.monotonic(), r))
             | RunInference(KeyedModelHandler(CodecLMModelHandler(config, "bench")))
             | beam.MapTuple(lambda entered, pr: json.dumps(
                 [entered, time.monotonic(), pr.inference.stats.usage.completion_tokens]))
             | beam.io.WriteToText(answers_file, num_shards=1, shard_name_template=""))
        wall = time.monotonic() - started
        answers = [json.loads(line) for line in open(answers_file)]
    tokens = sum(a[2] for a in answers)
    # From the first element reaching the model to the last answer leaving it.
    steady = tokens / max(1e-9, max(a[1] for a in answers) - min(a[0] for a in answers))
    return tokens, steady, tokens / wall


def memory() -> dict[str, Any]:
    """Peak RSS of `generate` (a fresh process each) on growing seed files against an
    instant server; everything after encoding is held small so the seeds dominate."""
    sizes = [int(s * SCALE) for s in (1_000, 10_000, 100_000)]
    out = {}
    # Seeds much alike (answers from a few words): the pool keeps every distinct seed
    # metadata, so distinct random answers would make the pool grow with the seeds.
    with FakeModelServer(ServerConfig(accept_rate=1.0, vocabulary=4)) as server:
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                seeds = os.path.join(tmp, "seeds.jsonl")
                with open(seeds, "w") as f:
                    for i in range(size):
                        f.write(json.dumps({"instruction": f"Seed {i}: explain idea {i}"})
                                + "\n")
                # Its own peak (VmHWM: benchmarks/peak_memory.py says why not
                # getrusage's, which read this process's size in every child).
                code = ("import sys; from benchmarks.peak_memory import high_water_mb; "
                        "from codeclm_beam.pipelines.generate import run; "
                        "run(sys.argv[1:]); print(high_water_mb())")
                started = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, "-c", code, "--seeds", seeds, "--output_dir",
                     os.path.join(tmp, "out"), "--no_cache", "--no_report",
                     "--strong_model", f"openai:strong@{server.base_url}/v1",
                     "--target_model", f"openai:target@{server.base_url}/v1",
                     "--num_metadata", "20", "--num_instructions", "20",
                     "--num_examples", "20", "--max_concurrency", "32"],
                    capture_output=True, text=True, cwd=ROOT, check=True)
                out[str(size)] = {"peak_rss_mb": round(float(
                    proc.stdout.strip().splitlines()[-1]), 1),
                    "wall_s": round(time.monotonic() - started, 1)}
    keys = list(out)
    out["rss_growth_over_input_growth"] = round(
        (out[keys[-1]]["peak_rss_mb"] / out[keys[0]]["peak_rss_mb"])
        / (int(keys[-1]) / int(keys[0])), 4)
    return out


def calls_against_budget() -> dict[str, Any]:
    """Model calls per stage against the method's formula, then a cached re-run."""
    from codeclm_beam.pipelines.generate import run
    with tempfile.TemporaryDirectory() as tmp, FakeModelServer(ServerConfig(
            accept_rate=0.6)) as server:
        seeds = os.path.join(tmp, "seeds.jsonl")
        with open(seeds, "w") as f:
            for i in range(20):
                f.write(json.dumps({"instruction": f"Seed instruction {i}"}) + "\n")
        argv = ["--seeds", seeds, "--output_dir", os.path.join(tmp, "out"),
                "--cache_dir", os.path.join(tmp, "cache"), "--no_report",
                "--strong_model", f"openai:strong@{server.base_url}/v1",
                "--target_model", f"openai:target@{server.base_url}/v1",
                "--num_metadata", "10", "--num_instructions", "50", "--num_examples", "1000"]
        manifest = run(argv)
        first = len(server.log)
        run(argv)
        second = len(server.log) - first
    acc = manifest["accounting"]
    rounds = acc["candidates"]["rounds"]
    formula = (acc["seeds"]["seeds"] + 2 * acc["metadata_pool"]["entries"]
               + sum(4 * r["candidates"] for r in rounds)
               + sum(r["candidates"] - r["fresh"] for r in rounds[1:]))
    kept = acc["candidates"]["kept"]
    return {"calls": first, "budget_formula": formula,
            "calls_over_formula": round(first / formula, 4),
            "kept_pairs": kept, "calls_per_kept_pair": round(first / max(kept, 1), 2),
            "calls_on_cached_rerun": second}


def online_vs_batch() -> dict[str, Any]:
    """The same CodecLM workload with vertex: models online and in batch mode (the
    loopback Vertex AI server's batchPredictionJobs, Cloud Storage on the emulator):
    calls, answers and cost side by side, and what the pipeline adds per batched
    request beyond the time its jobs spent at the server."""
    import glob

    from apache_beam.internal.gcp.auth import _Credentials
    from gcp_storage_emulator.server import create_server

    from codeclm_beam.pipelines.generate import run
    from tests.conftest import _free_port

    port = _free_port()
    storage = create_server("127.0.0.1", port, in_memory=True, default_bucket="bench")
    storage.start()
    # The emulator takes anonymous calls: skip Beam's ~30 s search for credentials.
    _Credentials._credentials_init, _Credentials._credentials = True, None
    os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}",
                      CODECLM_VERTEX_ACCESS_TOKEN="fake-token-for-loopback",
                      GOOGLE_CLOUD_PROJECT="bench", GOOGLE_CLOUD_LOCATION="us-central1")
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp, FakeModelServer(ServerConfig(
                accept_rate=0.6, strong_model="gemini-2.5-flash")) as server:
            # The same run online and in batch mode; then in batch mode eight times
            # as large, so what the pipeline adds per batched request is told apart
            # from what it adds once per run (start-up, and a wave of jobs per stage):
            # the slope between the two is read off a second of noise in the walls,
            # so the larger run adds a thousand requests or so. Polls at most 0.2 s
            # apart: a job seen done up to a poll late is time per wave, not per
            # request, and at 1 s apart 18 waves moved the slope by +-4 ms.
            small = max(4, int(20 * SCALE))
            large = 8 * small
            for mode, size in (("online", small), ("batch", small), ("batch_large", large)):
                seeds = os.path.join(tmp, f"seeds{size}.jsonl")
                with open(seeds, "w") as f:
                    for i in range(size):
                        f.write(json.dumps({"instruction": f"Seed instruction {i}"}) + "\n")
                before, jobs_before = len(server.log), set(server.batch_jobs)
                started = time.monotonic()
                manifest = run([
                    "--seeds", seeds, "--output_dir", os.path.join(tmp, mode),
                    "--vertex_mode", mode.split("_")[0], "--batch_dir",
                    f"gs://bench/batch-{mode}", "--batch_poll_seconds", "0.2", "--quiet",
                    "--no_report", "--strong_model", "vertex:gemini-2.5-flash",
                    "--target_model", "vertex:gemini-2.5-flash-lite",
                    "--model_base_url", server.base_url,
                    "--num_metadata", str(max(2, size // 2)),
                    "--num_instructions", str(max(8, int(2.5 * size))),
                    "--num_examples", "1000"])
                wall = time.monotonic() - started
                answered = [e for e in server.log[before:]
                            if e["outcome"] in ("ok", "batch_ok")]
                examples = sorted(
                    line for path in glob.glob(os.path.join(tmp, mode, "examples", "*.jsonl"))
                    for line in open(path))
                jobs = [job for name, job in server.batch_jobs.items()
                        if name not in jobs_before]
                out[mode] = {"wall_s": round(wall, 2), "requests": len(answered),
                             "cost_usd": manifest["cost"]["usd"], "examples": examples,
                             "jobs": manifest["model_calls"]["totals"]["batch_jobs"],
                             "at_server_s": round(_busy_seconds(jobs), 2)}
    finally:
        storage.stop()
    online, batch, large = out["online"], out["batch"], out["batch_large"]

    def overhead(r):  # what the pipeline added beyond its jobs' time at the server
        return r["wall_s"] - r["at_server_s"]
    return {"online": {k: v for k, v in online.items() if k != "examples"},
            "batch": {k: v for k, v in batch.items() if k != "examples"},
            "batch_large": {k: v for k, v in large.items() if k != "examples"},
            "calls_equal": online["requests"] == batch["requests"],
            "answers_equal": online["examples"] == batch["examples"],
            "kept_pairs": len(batch["examples"]),
            "cost_ratio_batch_over_online": round(batch["cost_usd"] / online["cost_usd"], 4),
            "jobs_at_server_s": batch["at_server_s"],
            "pipeline_overhead_per_batched_request_ms": round(
                1000 * overhead(batch) / batch["requests"], 2),
            # The slope between the two batch runs: what one more request adds.
            "pipeline_overhead_per_added_request_ms": round(
                1000 * (overhead(large) - overhead(batch))
                / max(1, large["requests"] - batch["requests"]), 2),
            "pipeline_overhead_per_job_s": round(overhead(batch) / batch["jobs"], 3)}


def _busy_seconds(jobs) -> float:
    """Seconds in which at least one job existed at the server (create to end)."""
    import datetime

    def seconds(stamp: str) -> float:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    spans = sorted((seconds(j["createTime"]), seconds(j["endTime"])) for j in jobs)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy


# The realistic workload's quotas, per model: a Vertex AI project's order of magnitude
# for a Flash model, scaled to what a 2-core machine can serve and measure.
REALISTIC_RPM, REALISTIC_TPM = 1500, 1_500_000


def realistic() -> dict[str, Any]:
    """A CodecLM run over four rounds under long-tailed latency and per-model request
    and token quotas (benchmarks/realistic.py), and the shaped workload there through
    this project's ContrastiveFilter and the peers."""
    from benchmarks.realistic import peers_under_the_tail
    from benchmarks.realistic import realistic_run
    with tempfile.TemporaryDirectory() as folder:
        run = realistic_run(int(400 * SCALE), REALISTIC_RPM, REALISTIC_TPM,
                            accept_rate=0.3, max_concurrency=256, folder=folder)
    return {"run": run, "peers": peers_under_the_tail(
        int(1000 * SCALE), REALISTIC_RPM, REALISTIC_TPM, max_concurrency=256)}


def scale() -> dict[str, Any]:
    """`generate` at 10^3, 10^4 and 10^5 pairs on the multi-processing DirectRunner
    (benchmarks/scale_curve.py), plotted."""
    from benchmarks.scale_curve import plot
    from benchmarks.scale_curve import scale_curve
    curve = scale_curve([int(s * SCALE) for s in (1_000, 10_000, 100_000)])
    curve["plot"] = os.path.relpath(plot(curve, os.path.join(RESULTS, "scale_curve.png")),
                                    ROOT)
    return curve


def side(met: bool) -> str:
    return "met" if met else "MISSED"


def against(value, op: str, target) -> str:
    """A figure with the side of its target it is on."""
    met = {"<=": value <= target, ">=": value >= target, "<": value < target,
           "==": value == target}[op]
    return f"{value} (target {op} {target}: {side(met)})"


def cpu_hours(ms_per_call: float) -> str:
    """What a Dataflow job of 9 M model calls pays at this CPU per call."""
    return f"x 9 M calls = {ms_per_call * 9e6 / 3.6e6:,.1f} CPU-hours"


def markdown(results: dict) -> str:
    """The results table: every figure with its target and which side it is on, or
    marked as reported (a figure with no target of its own)."""
    q, s, o = results["quota_use"], results["codeclm_shaped"], results["overhead"]
    ours = s["codeclm_beam"]
    lines = ["| benchmark | figure | value |", "| --- | --- | --- |",
             f"| quota use | achieved RPM / quota | {q['achieved_rpm_over_quota']} (reported; a run shorter than a minute sends a minute's quota at once) |",
             f"| quota use | share of 429s | {against(q['share_429'], '<', 0.02)} |",
             f"| quota use | wall / ideal wall | {q['wall_over_ideal']} (reported) |",
             f"| CodecLM workload | codeclm-beam wall (s) | {ours['wall_s']} (reported) |",
             f"| CodecLM workload | sequential loop wall (s) | {s['sequential_loop']['wall_s']} (reported) |",
             f"| CodecLM workload | requests per item (codeclm-beam) | {against(ours['requests_per_item'], '==', 4.0)} |",
             f"| CodecLM workload | speed-up over sequential | {s['speedup_over_sequential']} (reported) |",
             f"| CodecLM workload | CPU ms per model call, model layer ({cpu_hours(ours['cpu_ms_per_call'])}) | {ours['cpu_ms_per_call']} (reported) |"]
    for peer, op, target in (("distilabel", "<=", 0.8), ("curator", "<", 1.0)):
        if isinstance(s.get(peer), dict) and "wall_s" in s[peer]:
            lines.append(f"| CodecLM workload | {peer} wall (s) / requests per item | "
                         f"{s[peer]['wall_s']} / {s[peer]['requests_per_item']} (reported) |")
            lines.append(f"| CodecLM workload | codeclm-beam wall / {peer} wall | "
                         f"{against(round(ours['wall_s'] / s[peer]['wall_s'], 3), op, target)} |")
        else:
            lines.append(f"| CodecLM workload | {peer} | not measured: {s.get(peer)} |")
    lines += [f"| overhead | pipeline start-up until its first request (s) | {against(o['pipeline_startup_s'], '<=', 2.0)}"
              + (f"; the three runs: {o['pairs_startup_s']}" if "pairs_startup_s" in o else "") + " |",
              f"| overhead | pipeline steady-state / bare asyncio requests per s | {against(o['pipeline_steady_over_bare_throughput'], '>=', 0.9)}"
              + (f"; the three pairs: {o['pairs_steady_over_bare']}" if "pairs_steady_over_bare" in o else "") + " |",
              f"| overhead | whole pipeline run / bare asyncio throughput | {o['pipeline_whole_over_bare_throughput']} (reported) |"]
    if "pipeline_paused_s" in o:
        lines.append(f"| overhead | of the steady window, paused between dependent stages | "
                     f"{o['pipeline_paused_s']} s in {o['pipeline_pauses_between_stages']} "
                     f"pauses (reported) |")
        lines.append(f"| overhead | while sending / bare asyncio requests per s | "
                     f"{o['pipeline_while_sending_over_bare_throughput']} (reported) |")
    if "pipeline_cpu_ms_per_call" in o:
        lines.append(f"| overhead | CPU ms per model call, whole pipeline "
                     f"({cpu_hours(o['pipeline_cpu_ms_per_call'])}) | "
                     f"{o['pipeline_cpu_ms_per_call']} (reported; the loopback server's CPU included) |")
    if "adaptive" in results:
        a = results["adaptive"]
        rpm = " then ".join(f"{int(r)}" for _, r in a["schedule_rpm"])
        lines += [f"| adaptive concurrency (capacity {rpm} RPM, no quota given) | answers per s / capacity per s | {against(a['answers_over_capacity'], '>=', 0.9)} |",
                  f"| adaptive concurrency | share of 429s | {against(a['share_429'], '<', 0.02)} |",
                  f"| adaptive concurrency | elements lost | {against(a['lost'], '==', 0)} |",
                  f"| adaptive concurrency | by phase: answers / capacity | {a['by_phase']} (reported; plot: {a['plot']}) |"]
    if "embedded" in results:
        e = results["embedded"]
        lines.append(f"| embedded model | pipeline (steady) / direct tokens per s | {against(e['pipeline_over_direct'], '>=', 0.9)} |")
        lines.append(f"| embedded model | pipeline (whole run) / direct tokens per s | {e.get('pipeline_whole_over_direct')} (reported) |")
        lines.append(f"| embedded model | direct tokens per s, plain CPU buffers / llama.cpp's default load | {e['direct_tokens_per_s']} / {e.get('llama_cpp_default_load_tokens_per_s')} (reported) |")
    if "memory" in results:
        m = results["memory"]
        lines.append(f"| memory | RSS growth / input growth | {m['rss_growth_over_input_growth']} (reported) |")
    c = results["calls"]
    lines += [f"| calls | calls / budget formula | {against(c['calls_over_formula'], '==', 1.0)} |",
              f"| calls | calls per kept pair | {c['calls_per_kept_pair']} (reported) |",
              f"| calls | calls on a cached re-run | {against(c['calls_on_cached_rerun'], '==', 0)} |"]
    if "online_vs_batch" in results:
        b = results["online_vs_batch"]
        lines += [f"| online vs batch | calls equal / answers equal | {b['calls_equal']} / {b['answers_equal']} (target True / True: {side(b['calls_equal'] and b['answers_equal'])}) |",
                  f"| online vs batch | cost batch / online | {against(b['cost_ratio_batch_over_online'], '<=', 0.5)} |",
                  f"| online vs batch | pipeline overhead per batched request, whole run (ms) | {b['pipeline_overhead_per_batched_request_ms']} (reported: start-up and job waves over {b['batch']['requests']} requests) |"]
        if "pipeline_overhead_per_added_request_ms" in b:
            lines.append(f"| online vs batch | pipeline overhead per added batched request (ms) | {against(b['pipeline_overhead_per_added_request_ms'], '<=', 5.0)} |")
    if "dedup" in results:
        d = results["dedup"]
        beam, base = d["beam"], d["baseline"]
        recall = {kind: f"{beam['recall'][kind]} vs {base['recall'][kind]}"
                  for kind in beam["recall"]}
        lines += [f"| dedup ({beam['instructions']:,} instructions, {beam['planted']:,} planted copies; "
                  f"DeduplicateInstructions, {d['bands'][0]} x {d['bands'][1]} bands / datasketch "
                  f"MinHashLSH(threshold={d['threshold']:g})) | recall of near copies at Jaccard "
                  f"{d['threshold']:g} (the threshold) | "
                  f"{recall['0.80']} (target >= 0.99: {side(beam['recall']['0.80'] >= 0.99)}; "
                  f"computed miss rate {d['miss_rate_at_threshold']:.2%}) |",
                  f"| dedup | recall at 0.82; at 0.9; of exact copies | "
                  f"{recall['0.82']}; {recall['0.90']}; {recall['exact']} "
                  f"(target >= 0.99: {side(min(beam['recall'].values()) >= 0.99)}) |",
                  f"| dedup | precision | {beam['precision']} vs {base['precision']} "
                  f"(target 1.0: {side(beam['precision'] == 1.0)}) |",
                  f"| dedup | instructions per CPU-second | "
                  f"{beam['instructions_per_cpu_s']} vs {base['instructions_per_cpu_s']} "
                  f"(ratio {d['throughput_beam_over_baseline']}, reported) |",
                  f"| dedup | peak RSS MB | {beam['peak_rss_mb']} vs {base['peak_rss_mb']} "
                  f"(ratio {d['peak_memory_beam_over_baseline']}, reported) |"]
    if "decontamination" in results:
        d = results["decontamination"]
        new, old = d["rule"], d["single_8_gram"]
        lines += [f"| decontamination ({d['questions']} benchmark-style questions, each edited 4 ways; "
                  f"Decontaminate / the single-8-gram rule) | recall: one word changed, two words, "
                  f"a clause added, casing and punctuation | "
                  + " / ".join(f"{new[k]} vs {old[k]}" for k in (
                      "one_word_changed", "two_words_changed", "clause_added",
                      "casing_and_punctuation"))
                  + f" (target one word >= 0.9: {side(new['one_word_changed'] >= 0.9)}) |",
                  f"| decontamination | false positives on {d['questions']} instructions sharing "
                  f"a question's topic | {new['same_topic']} vs {old['same_topic']} "
                  f"(target <= 0.05: {side(new['same_topic'] <= 0.05)}) |"]
    lines += realistic_rows(results) + scale_rows(results)
    return "\n".join(lines) + "\n"


def realistic_rows(results: dict) -> list[str]:
    if "realistic" not in results:
        return []
    r, p = results["realistic"]["run"], results["realistic"]["peers"]
    idle = r["idle"]
    worst = "; ".join(f"{k} {v} s" for k, v in list(idle["idle_s_by_boundary"].items())[:4])
    lines = [f"| realistic (latency median 3 s, p99 30 s; {REALISTIC_RPM} RPM and "
             f"{REALISTIC_TPM:,} TPM per model) | candidates judged / rounds / kept pairs | "
             f"{r['candidates_judged']} / {r['rounds']} / {r['kept_pairs']} (reported) |",
             f"| realistic | quota use: ideal {r['ideal_s']} s ({r['binding_quota']}) / first "
             f"request to last answer {r['requests_span_s']} s | "
             f"{against(r['quota_use'], '>=', 0.9)} |",
             f"| realistic | ceiling for any shape of the method: ideal / (pool ready at "
             f"{r['pool_ready_s']} s + the quota's time for the rest) | "
             f"{r['quota_use_ceiling']} (reported) |",
             f"| realistic | share of the span with the binding quota idle | "
             f"{idle['idle_share']} (reported; most at: {worst}) |",
             f"| realistic | latency p50 / p99 / max (s); 429s | "
             f"{r['latency_p50_p99_max_s']}; {r['answers_429']} (reported) |"]
    if "dedup_reference_buckets" in r:
        b = r["dedup_reference_buckets"]
        lines.append(f"| realistic | rounds 2-4: buckets of earlier candidates regrouped by "
                     f"the screens / left out (no candidate of the round in the bucket) | "
                     f"{b['sent']:,} / {b['skipped']:,} (reported) |")
    ours = p.get("codeclm_beam", {})
    for name in ("codeclm_beam", "distilabel", "curator"):
        entry = p.get(name, {})
        if "span_s" in entry:
            lines.append(f"| realistic shaped workload (both answers, both judge orders) | "
                         f"{name}: span (s) / requests / share of 429s | {entry['span_s']} / "
                         f"{entry['requests']} / {entry['share_429']} (ideal {p['ideal_s']} s) |")
        else:
            lines.append(f"| realistic shaped workload | {name} | not measured: "
                         f"{entry.get('error', '')[-200:]} |")
    if "codeclm_beam_over_best_peer" in p and "span_s" in ours:
        lines.append(f"| realistic shaped workload | codeclm-beam span / best peer's | "
                     f"{against(p['codeclm_beam_over_best_peer'], '<=', 0.8)} |")
    return lines


def scale_rows(results: dict) -> list[str]:
    if "scale_curve" not in results:
        return []
    s = results["scale_curve"]
    growth = s["growth_smallest_to_largest"]
    sizes = " / ".join(f"{p['pairs']:,}" for p in s["points"])
    lines = []
    for key, label, target in (("cpu_ms_per_call", "CPU ms per model call", 1.2),
                               ("worker_peak_mb", "peak MB, largest worker process", 1.2),
                               ("launcher_peak_mb", "peak MB, launcher process", 1.2),
                               ("wall_ms_per_pair", "wall ms per pair", None)):
        values = " / ".join(str(p[key]) for p in s["points"])
        figure = (against(growth[key], "<=", target) if target
                  else f"{growth[key]} (reported)")
        lines.append(f"| scale ({sizes} pairs, multi-processing DirectRunner) | {label}: "
                     f"{values}; growth | {figure} |")
    # Every answer is a clear win, so a point that loses no element judges each pair
    # once, in one round, with the server's count of requests: the manifest's balance
    # alone did not catch the 10^5 point's losses (docs/performance.md).
    whole = [p["pairs"] for p in s["points"]
             if p.get("rounds") == [[p["pairs"], p["pairs"]]]
             and p.get("requests") == p.get("server_requests") and p.get("balanced")]
    lines.append(f"| scale | points that keep every pair in one round, with the "
                 f"server's count of requests and a balanced manifest: {len(whole)} of "
                 f"{len(s['points'])} | {side(len(whole) == len(s['points']))} |")
    for p in s["points"]:
        if p.get("dead_letters"):
            reasons = "; ".join(f"{n:,} {why}" for why, n in p["dead_letters"].items())
            lines.append(f"| scale | {p['pairs']:,} pairs: dead letters | {reasons} |")
    buckets = [p.get("reference_buckets") for p in s["points"]]
    if all(buckets):
        lines.append("| scale | buckets of earlier candidates regrouped by the screens / "
                     "left out (no candidate after round 1) | " + "; ".join(
                         f"{p['pairs']:,} pairs: {b['sent']:,} / {b['skipped']:,}"
                         for p, b in zip(s["points"], buckets)) + " (reported) |")
    lines.append(f"| scale | plot | {s['plot']} |")
    return lines


def main() -> None:
    os.makedirs(RESULTS, exist_ok=True)
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    latest = os.path.join(RESULTS, "latest.json")
    results: dict[str, Any] = {}
    if only and os.path.exists(latest):
        with open(latest) as f:
            results = json.load(f)  # re-measure some steps, keep the others
    results.update({"scale": SCALE, "cpus": os.cpu_count(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    steps = [("quota_use", quota_use), ("codeclm_shaped", codeclm_shaped),
             ("overhead", overhead), ("adaptive", adaptive),
             ("calls", calls_against_budget),
             ("online_vs_batch", online_vs_batch), ("memory", memory),
             ("embedded", embedded),
             ("dedup", lambda: dedup(int(100_000 * SCALE))),
             ("decontamination", decontamination),
             ("realistic", realistic), ("scale_curve", scale)]
    for name, step in steps:
        if only and name not in only:
            continue
        print(f"bench: {name} ...", flush=True)
        results[name] = step()
        print(json.dumps({k: v for k, v in results[name].items() if k != "curve"}),
              flush=True)
    with open(latest, "w") as f:
        json.dump(results, f, indent=2)
    if all(name in results for name, _ in steps):
        with open(os.path.join(RESULTS, "latest.md"), "w") as f:
            f.write(markdown(results))
        print(markdown(results))


if __name__ == "__main__":
    main()
