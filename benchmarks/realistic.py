"""A CodecLM run as users meet it: `generate` over four rounds against a server whose
answers take a long-tailed time (lognormal, median 3 s, one in a hundred over 30 s,
seeded) under per-model request and token quotas enforced as Vertex AI enforces them
(429 `RESOURCE_EXHAUSTED` with a `RetryInfo` delay), the client told its quota as a
user would tell it.

Reported: the wall time from the first request to the last answer against the
quota-bound ideal (the time the binding quota needs for the run's requests and
tokens), and where the quota sat idle: each second in which the binding model had
fewer requests in flight than its quota allows (Little's law: the quota's rate times
the mean latency) while the last minute's quota still had room, charged to the stage
whose answers were still out (a stage's tail) or, with nothing out, to the stage that
had just ended. Beside it, the ceiling no shape of the method can pass on the run:
the ideal over the time until the pool could be built (the last encode answer) plus
what the binding quota needs for everything after it.

    python benchmarks/realistic.py [--examples 400] [--rpm 1500]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fake_model_server import FakeModelServer  # noqa: E402
from benchmarks.fake_model_server import ServerConfig  # noqa: E402

MEDIAN_S, P99_S = 3.0, 30.0
STRONG, TARGET = "gemini-2.5-flash", "gemini-2.5-flash-lite"
# What the server answers a request for, by the schema's fields: the stage that asked.
STAGES_BY_SCHEMA = {
    ("skills", "use_case"): "encode", ("rubrics",): "rubrics",
    ("instructions",): "decode", ("instruction",): "improve",
    ("assistant_1_score", "assistant_2_score"): "judge"}
# A stage's requests separated by this long with none of them out are two of its runs
# (its rounds).
NEW_RUN_AFTER_S = 2.0


def server_config(rpm: float, tpm: float, accept_rate: float) -> ServerConfig:
    return ServerConfig(latency_median=MEDIAN_S, latency_p99=P99_S, rpm=rpm, tpm=tpm,
                        quota_per_model=True, accept_rate=accept_rate,
                        strong_model=STRONG, seed=50)


def stage_of(entry: dict) -> str:
    keys = tuple(entry.get("schema_keys") or ())
    if keys:
        return STAGES_BY_SCHEMA.get(keys, "/".join(keys))
    return "answer_strong" if entry["model"] == STRONG else "answer_target"


def answered(log: list) -> list[dict]:
    """The answered requests, each as its start, end, model and stage."""
    out = []
    for entry in log:
        if entry.get("outcome") == "ok" and entry.get("latency") is not None:
            end = entry["time"]
            out.append({"start": end - entry["latency"], "end": end,
                        "model": entry["model"], "stage": stage_of(entry)})
    return sorted(out, key=lambda r: r["start"])


def stage_runs(requests: list[dict]) -> dict:
    """Each stage's runs in time order: (first start, last end), a new run when none
    of its requests was out for NEW_RUN_AFTER_S."""
    runs = collections.defaultdict(list)
    for r in requests:
        mine = runs[r["stage"]]
        if mine and r["start"] <= mine[-1][1] + NEW_RUN_AFTER_S:
            mine[-1][1] = max(mine[-1][1], r["end"])
        else:
            mine.append([r["start"], r["end"]])
    return runs


def round_at(moment: float, improve_runs: list) -> int:
    """The round under way at `moment`: improve runs between two rounds, so round
    1 + the improve runs begun by then."""
    return 1 + sum(1 for start, _ in improve_runs if start <= moment)


def label(stage: str, moment: float, improve_runs: list) -> str:
    """A stage at a moment, named by its round (the codec stages run once, before
    round 1)."""
    if stage in ("encode", "rubrics", "decode"):
        return stage
    number = round_at(moment, improve_runs)
    return (f"improve for round {number}" if stage == "improve"
            else f"{stage}, round {number}")


def idle_by_boundary(requests: list[dict], model: str, rpm: float) -> dict[str, Any]:
    """Seconds of unused quota of `model` (see the module's doc), charged to stages."""
    mine = [r for r in requests if r["model"] == model]
    if not mine:
        return {}
    first, last = mine[0]["start"], max(r["end"] for r in mine)
    mean_latency = sum(r["end"] - r["start"] for r in mine) / len(mine)
    allowed = rpm / 60 * mean_latency
    improve_runs = stage_runs(mine).get("improve", [])
    ends = sorted((r["end"], label(r["stage"], r["start"], improve_runs)) for r in mine)
    starts = [r["start"] for r in mine]
    idle, charged = 0.0, collections.Counter()
    second, bins = first, 0
    while second < last:
        bins += 1
        window_end = second + 1
        out = collections.Counter()
        for r in mine:  # the requests out during this second, by run
            if r["start"] < window_end and r["end"] > second:
                overlap = min(r["end"], window_end) - max(r["start"], second)
                out[r["stage"]] += overlap
        in_flight = sum(out.values())
        sent_last_minute = sum(1 for s in starts if second - 60 < s <= second)
        if in_flight < allowed and sent_last_minute < rpm:
            share = 1 - in_flight / allowed
            idle += share
            if out:
                stage = out.most_common(1)[0][0]
                charged[f"tail of {label(stage, second, improve_runs)}"] += share
            else:
                ended = [name for end, name in ends if end <= second]
                charged[f"after {ended[-1] if ended else 'start'}"] += share
        second = window_end
    return {"mean_latency_s": round(mean_latency, 2),
            "allowed_in_flight": round(allowed, 1),
            "idle_share": round(idle / max(bins, 1), 3),
            "idle_s_by_boundary": {k: round(v, 1) for k, v in charged.most_common()}}


def quota_seconds(answered_entries: list[dict], model: str, kind: str, rpm: float,
                  tpm: float) -> float:
    """The seconds `model`'s quota of `kind` ("requests" or "tokens": input tokens, as
    Vertex AI counts them) needs for these answered requests."""
    mine = [e for e in answered_entries if e["model"] == model]
    if kind == "requests":
        return 60 * len(mine) / rpm
    return 60 * sum(e.get("prompt_tokens") or 0 for e in mine) / tpm


def realistic_run(examples: int, rpm: float, tpm: float, accept_rate: float,
                  max_concurrency: int, folder: str) -> dict[str, Any]:
    from codeclm_beam.pipelines.generate import run
    os.environ.setdefault("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    seeds = os.path.join(folder, "seeds.jsonl")
    with open(seeds, "w") as f:
        for i in range(100):
            f.write(json.dumps({"instruction": f"Seed {i}: explain topic {i} to a "
                                               f"reader new to field {i % 9}."}) + "\n")
    with FakeModelServer(server_config(rpm, tpm, accept_rate)) as server:
        started = time.time()
        manifest = run([
            "--seeds", seeds, "--output_dir", os.path.join(folder, "out"),
            "--strong_model", f"vertex:{STRONG}", "--target_model", f"vertex:{TARGET}",
            "--model_base_url", server.base_url, "--vertex_project", "bench",
            "--num_examples", str(examples), "--max_iterations", "4",
            "--max_requests_per_minute", str(rpm), "--max_tokens_per_minute", str(tpm),
            "--max_concurrency", str(max_concurrency),
            "--no_report", "--no_cache", "--quiet"], lean=True)
        finished = time.time()
        log = list(server.log)
    requests = answered(log)
    throttled = sum(1 for e in log if e.get("outcome") == "throttled")
    done = [e for e in log if e.get("outcome") == "ok"]
    tokens = collections.Counter()
    for e in done:
        tokens[e["model"]] += e.get("prompt_tokens") or 0
    by_model = collections.Counter(r["model"] for r in requests)
    # The binding quota: the model and the quota (requests or tokens) needing longest.
    needs = {(model, kind): quota_seconds(done, model, kind, rpm, tpm)
             for model in by_model for kind in ("requests", "tokens")}
    (binding_model, binding_kind), ideal = max(needs.items(), key=lambda kv: kv[1])
    span = requests[-1]["end"] - requests[0]["start"] if requests else 0.0
    # What no shape of the method can beat on this run: the pool needs every seed's
    # metadata (the method's step 2) before any rubric or decode call, so until the
    # last encode answer only encode requests can use the quota, and everything else
    # still needs the quota's time after it (the last answers' own latency aside,
    # so a ceiling, not an estimate).
    encode_ends = [r["end"] for r in requests if r["stage"] == "encode"]
    pool_ready = max(encode_ends) - requests[0]["start"] if encode_ends else 0.0
    after_pool = quota_seconds([e for e in done if stage_of(e) != "encode"],
                               binding_model, binding_kind, rpm, tpm)
    acc = manifest["accounting"]["candidates"]
    return {
        "candidates_judged": sum(r["candidates"] for r in acc["rounds"]),
        "rounds": len(acc["rounds"]), "kept_pairs": acc["kept"],
        "requests": dict(by_model), "prompt_tokens": dict(tokens),
        "answers_429": throttled,
        # The server's outcomes, and the client's retries and failures (a request the
        # server never answered shows here, as a retry after --request_timeout).
        "server_outcomes": dict(collections.Counter(e.get("outcome") for e in log)),
        "client_retries": manifest["model_calls"]["totals"].get("retries", 0),
        "client_failures": manifest["model_calls"]["totals"].get("failures", 0),
        # What the rounds' screens regrouped of the candidates judged before.
        "dedup_reference_buckets": manifest["accounting"]["screening"]["reference_buckets"],
        "binding_quota": f"{binding_model} {binding_kind}",
        "ideal_s": round(ideal, 1), "requests_span_s": round(span, 1),
        "whole_wall_s": round(finished - started, 1),
        "quota_use": round(ideal / span, 3) if span else None,
        "pool_ready_s": round(pool_ready, 1),
        "quota_use_ceiling": round(ideal / (pool_ready + after_pool), 3),
        "idle": idle_by_boundary(requests, binding_model, rpm),
        "latency_p50_p99_max_s": _percentiles([r["end"] - r["start"] for r in requests]),
        # When each codec stage ran (seconds from the first request): whether rubrics
        # and decode overlap, or one waits for the other's tail.
        "codec_stages_s": {
            stage: [[round(start - requests[0]["start"], 1), round(end - requests[0]["start"], 1)]
                    for start, end in runs]
            for stage, runs in stage_runs(requests).items()
            if stage in ("encode", "rubrics", "decode")} if requests else {},
    }


def run_side(side: str, server: FakeModelServer, items: int, rpm: float,
              tpm: Optional[float] = None, flags: tuple = (),
              timeout_s: float = 3600) -> dict[str, Any]:
    """The CodecLM-shaped workload (both answers, both judge orders per item) by one
    side, in a process of its own against `server`: this project
    (`codeclm_workload.py`) or a peer (`peers/workload.py`, in benchmarks/.venv-peers).
    Its own report, and the server's count of what it was sent."""
    logged = len(server.log)
    if side == "codeclm_beam":
        command = [sys.executable, os.path.join(ROOT, "benchmarks", "codeclm_workload.py"),
                   *flags]
        env = None
    else:
        peers_python = os.path.join(ROOT, "benchmarks", ".venv-peers", "bin", "python")
        if not os.path.exists(peers_python):
            return {"error": "not measured: run `make bench` to create "
                             "benchmarks/.venv-peers"}
        command = [peers_python, os.path.join(ROOT, "benchmarks", "peers", "workload.py"),
                   "--peer", side]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.mkdtemp(),
               "TIKTOKEN_CACHE_DIR": os.path.join(ROOT, "benchmarks", ".tiktoken-cache")}
    command += ["--base_url", f"{server.base_url}/v1", "--items", str(items),
                "--rpm", str(rpm)]
    if tpm and side != "distilabel":  # distilabel has no rate limit to give it
        command += ["--tpm", str(tpm)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f} s",
                "requests": len(server.log) - logged}
    if proc.returncode:
        return {"error": proc.stderr[-800:]}
    log = server.log[logged:]
    requests = answered(log)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]),
            "requests": len(log), "answered": len(requests),
            "share_429": round(sum(1 for e in log if e.get("outcome") == "throttled")
                               / max(len(log), 1), 4),
            "span_s": round(requests[-1]["end"] - requests[0]["start"], 1)
            if requests else None}


PEER_TIMEOUT_IDEALS = 4


def peers_under_the_tail(items: int, rpm: float, tpm: float,
                         max_concurrency: int) -> dict[str, Any]:
    """The shaped workload of `make bench` (an answer from each model, both judge
    orders), under the long tail and the quotas: this project through its
    ContrastiveFilter stage, distilabel and curator; each side's span is the server's,
    from its first request to its last answer."""
    out = {}
    # The strong model answers and judges: 3 of each item's 4 requests.
    ideal = 60 * 3 * items / rpm
    for side, flags in (("codeclm_beam", ("--pipeline", "--max_concurrency",
                                          str(max_concurrency))),
                        ("distilabel", ()), ("curator", ())):
        with FakeModelServer(dataclasses.replace(
                server_config(rpm, tpm, 0.5), strong_model="strong")) as server:
            # Stopped at four times the ideal: a side that needs more is reported so
            # (it is then no best peer to be measured against unless none finished).
            out[side] = run_side(side, server, items, rpm, tpm, flags,
                                 timeout_s=PEER_TIMEOUT_IDEALS * ideal)
    out["ideal_s"] = round(ideal, 1)
    spans = {side: r.get("span_s") for side, r in out.items()
             if isinstance(r, dict) and r.get("span_s")}
    peers = [spans[p] for p in ("distilabel", "curator") if p in spans]
    if "codeclm_beam" in spans and peers:
        out["codeclm_beam_over_best_peer"] = round(spans["codeclm_beam"] / min(peers), 3)
    return out


def _percentiles(values: list[float]) -> list[float]:
    values = sorted(values)
    if not values:
        return []
    return [round(values[len(values) // 2], 2), round(values[int(len(values) * .99)], 2),
            round(values[-1], 2)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--rpm", type=float, default=1500)
    parser.add_argument("--tpm", type=float, default=600_000)
    parser.add_argument("--accept_rate", type=float, default=0.3)
    parser.add_argument("--max_concurrency", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(realistic_run(args.examples, args.rpm, args.tpm, args.accept_rate,
                                       args.max_concurrency, folder)))


if __name__ == "__main__":
    main()
