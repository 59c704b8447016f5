"""The run manifest: what ran, what it cost, and where every element went.

Counts come from the run's Beam metrics (the same counters Dataflow shows), so the
manifest works on any runner that reports committed or attempted counters.
"""
from __future__ import annotations

import collections
import datetime
import math
import time
from typing import Any
from typing import Iterable
from typing import Optional

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam.model.handler import StageMetrics
from codeclm_beam.options import is_dry_run
from codeclm_beam.pipelines.outputs import OutputDirectory
from codeclm_beam.version import __version__

MODEL_STAGES = ("encode", "rubrics", "decode", "answer_strong", "answer_target", "judge",
                "improve")


def run_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                 outputs: OutputDirectory, tool: str, run_id: str,
                 wait: bool = True) -> tuple[Any, Optional[dict[str, Any]]]:
    """Runs a built pipeline whose outputs go to `outputs.staging`: (the finished
    result, None), or, when nothing finishes here (a dry run, or a launch that does not
    wait), (the result, what to return instead). A run that fails leaves the previous
    run's outputs as they were, and its own staging area is removed."""
    dry_run = is_dry_run(options)
    try:
        result = pipeline.run()
        if dry_run or not wait:
            # A Dataflow dry run builds and validates the whole job but submits
            # nothing. A launch that does not wait leaves its outputs where the job
            # writes them: nobody is there to move them into place.
            job_id = getattr(result, "job_id", None)
            return result, {"tool": tool, "run_id": run_id, "submitted": not dry_run,
                            "job": str((job_id() if callable(job_id) else None) or result),
                            "outputs": None if dry_run else outputs.staging}
        result.wait_until_finish()
    except BaseException:
        if not dry_run:
            outputs.abandon()
        raise
    return result, None


def run_header(tool: str, run_id: str, started: float) -> dict[str, Any]:
    """What ran and when: the first fields of a manifest or summary."""
    return {"tool": tool, "code_version": __version__, "run_id": run_id,
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "wall_time_seconds": round(time.time() - started, 2)}


def collect_counters(result) -> dict[str, dict[str, int]]:
    """{namespace: {name: value}} for every codeclm counter of a finished run."""
    counters: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace = counter.key.metric.namespace
        if not namespace.startswith("codeclm/"):
            continue
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        counters[namespace][name] = counters[namespace].get(name, 0) + (value or 0)
    return dict(counters)


def model_calls(counters: dict) -> dict[str, Any]:
    """Per stage: the model and its requests, cache hits, retries, tokens..."""
    stages: dict[str, Any] = {}
    for namespace, values in counters.items():
        parts = namespace.split("/", 2)
        if len(parts) != 3 or parts[1] in ("flow", "dead_letter"):
            continue
        _, stage, model = parts
        entry = stages.setdefault(stage, {"models": {}})
        entry["models"][model] = {name: values.get(name, 0) for name in StageMetrics.NAMES
                                  if name != "throttled_ms"}
        entry["models"][model]["throttled_seconds"] = values.get("throttled_ms", 0) / 1000
    totals = collections.Counter()
    for entry in stages.values():
        for numbers in entry["models"].values():
            totals.update(numbers)
    return {"by_stage": stages, "totals": dict(totals)}


def accounting(counters: dict, max_iterations: int, from_metadata: bool,
               keep_unresolved: bool = False, num_metadata: int = 0) -> dict[str, Any]:
    """Where every seed and every candidate went, with the identities checked."""
    flow = counters.get("codeclm/flow", {})
    dead = counters.get("codeclm/dead_letter", {})
    get = flow.get
    checks = {}
    seeds: dict[str, Any] = {}
    if not from_metadata:
        seeds = {"rows_read": get("read_seeds.rows", 0), "seeds": get("seeds", 0),
                 "duplicates_dropped": get("read_seeds.duplicates", 0),
                 "dead_letter": dead.get("read_seeds", 0),
                 "encoded": get("metadata", 0), "encode_dead_letter": dead.get("encode", 0)}
        checks["rows = seeds + duplicates + dead letters"] = (
            seeds["rows_read"] == seeds["seeds"] + seeds["duplicates_dropped"]
            + seeds["dead_letter"])
        checks["seeds = metadata + encode dead letters"] = (
            seeds["seeds"] == seeds["encoded"] + seeds["encode_dead_letter"])
    else:
        seeds = {"rows_read": get("read_metadata.rows", 0),
                 "metadata": get("user_metadata", 0),
                 "duplicates_dropped": get("read_metadata.duplicates", 0),
                 "dead_letter": dead.get("read_metadata", 0)}
        checks["rows = metadata + duplicates + dead letters"] = (
            seeds["rows_read"] == seeds["metadata"] + seeds["duplicates_dropped"]
            + seeds["dead_letter"])
    pool = {"entries": get("metadata_pool", 0), "asked": num_metadata,
            "note": ("every distinct (use case, skills) of the seeds is kept, as the "
                     "method does: the pool is larger than --num_metadata"
                     if get("metadata_pool", 0) > num_metadata else ""),
            "rubric_sets": get("rubric_sets", 0),
            "rubrics_dead_letter": dead.get("rubrics", 0),
            "decode_dead_letter": dead.get("decode", 0)}
    checks["pool = rubric sets + rubrics dead letters"] = (
        pool["entries"] == pool["rubric_sets"] + pool["rubrics_dead_letter"])
    rounds = []
    for r in range(1, max_iterations + 1):
        rounds.append({"round": r, "candidates": get(f"round{r}.candidates", 0),
                       # of the candidates, fresh basic instructions from the reserve
                       "fresh": get(f"round{r}.fresh", 0),
                       "kept": get(f"round{r}.kept", 0),
                       "undecided": get(f"round{r}.undecided", 0),
                       "not_needed": get(f"round{r}.not_needed", 0)})
    lost = (dead.get("answer_strong", 0) + dead.get("answer_target", 0)
            + get("judge_incomplete", 0) + dead.get("improve", 0))
    kept_total = sum(r["kept"] for r in rounds)
    last = rounds[-1]["undecided"] if rounds else 0
    not_needed = sum(r["not_needed"] for r in rounds)
    reserve_unused = get("reserve_unused", 0)
    candidates = {"basic_instructions": get("basic_instructions", 0),
                  "kept": kept_total, "unresolved_after_last_round": last,
                  "not_needed": not_needed, "reserve_unused": reserve_unused,
                  "lost_to_dead_letters": lost,
                  "examples_written": get("examples", 0), "surplus": get("surplus", 0),
                  "rounds": rounds}
    checks["basic = kept + unresolved + not needed + unused reserve + dead letters"] = (
        candidates["basic_instructions"]
        == kept_total + last + not_needed + reserve_unused + lost)
    kept_all = kept_total + (last if keep_unresolved else 0)
    checks["kept = examples + surplus"] = (
        candidates["examples_written"] + candidates["surplus"] == kept_all)
    return {"seeds": seeds, "metadata_pool": pool, "candidates": candidates,
            "dead_letters_by_stage": dict(dead), "checks": checks,
            "balanced": all(checks.values())}


def delivery(accounting_: dict, num_examples: int, num_instructions: int,
             rerun: str) -> dict[str, Any]:
    """Asked N, delivered K; when K < N, why, and the command that closes the gap."""
    cand = accounting_["candidates"]
    delivered = cand["examples_written"]
    result = {"asked": num_examples, "delivered": delivered}
    if delivered >= num_examples:
        return result
    reasons = []
    if cand["reserve_unused"] == 0:
        reasons.append(f"all {cand['basic_instructions']} basic instructions were used")
    if cand["unresolved_after_last_round"]:
        reasons.append(f"{cand['unresolved_after_last_round']} candidates were still "
                       "within the threshold after the last round (rejected/)")
    if cand["lost_to_dead_letters"]:
        reasons.append(f"{cand['lost_to_dead_letters']} candidates were lost to dead "
                       "letters (dead_letter/)")
    if not cand["basic_instructions"]:
        reasons.append("no basic instruction was decoded (see dead_letter/)")
    # More basic instructions, in proportion to what was missing, with some room.
    share = delivered / num_examples if delivered else 0.25
    more = math.ceil(num_instructions / share * 1.25)
    result.update(
        gap=num_examples - delivered, reason="; ".join(reasons) or "unknown",
        to_close_the_gap=(f"{rerun} --num_instructions {more}  (the same --output_dir "
                          "reuses every cached encode and rubrics answer; decode and "
                          "the new instructions' calls are paid)"))
    return result
