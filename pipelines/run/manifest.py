"""The run manifest: what ran, what it cost, and where every element went.

Counts come from the run's Beam metrics (the same counters Dataflow shows), so the
manifest works on any runner that reports committed or attempted counters.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import time
from typing import Any
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam import metrics as m
from codeclm_beam.metrics import RunCounters
from codeclm_beam.model.config import BATCH
from codeclm_beam.model.config import ONLINE
from codeclm_beam.pipelines.run.args import ViewedOnce
from codeclm_beam.pipelines.run.args import is_dry_run
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.lean import lean_run
from codeclm_beam.transforms.method import JUDGED
from codeclm_beam.transforms.method import METHOD
from codeclm_beam.transforms.method import ModelStage
from codeclm_beam.transforms.method import calls_per
from codeclm_beam.transforms.method import roles
from codeclm_beam.version import __version__



def new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline for these options. Where they name no runner, or the DirectRunner,
    it runs on Beam's FnApiRunner, by its public runner name: that is where the
    DirectRunner ends for a batch pipeline, after first converting the whole graph for
    its Prism runner and downloading Prism's binary from GitHub (2.4 s of a local
    run's start-up here, where the download fails; elsewhere, a run on another runner
    than the one tested)."""
    from apache_beam.options.pipeline_options import StandardOptions
    options = options.view_as(ViewedOnce)
    runner = options.view_as(StandardOptions).runner
    if runner is not None and str(runner).lower() not in ("directrunner", "direct"):
        return beam.Pipeline(options=options)
    return beam.Pipeline(runner="FnApiRunner", options=options)


def run_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                 outputs: OutputFolder, tool: str, run_id: str,
                 wait: bool = True, progress=None) -> tuple[Any, Optional[dict[str, Any]]]:
    """Runs a built pipeline whose outputs go to `outputs.run_dir`: (the finished
    result, None), or, when nothing finishes here (a dry run, or a launch that does not
    wait), (the result, what to return instead). A run that fails leaves the previous
    run current, and its own folder is removed (`commit.run_in_folder`). `progress` is a
    context (pipelines.run.progress.progress_for) the run happens in."""
    from codeclm_beam.model.guard import ERROR_SHARE
    dry_run = is_dry_run(options)
    ERROR_SHARE.reset()
    try:
        with progress or contextlib.nullcontext():
            result = pipeline.run()
            if not dry_run and wait:
                result.wait_until_finish()
        if dry_run or not wait:
            # A Dataflow dry run builds and validates the whole job but submits
            # nothing. A launch that does not wait leaves its outputs where the job
            # writes them: nobody is there to move them into place.
            job_id = getattr(result, "job_id", None)
            launch = {"tool": tool, "run_id": run_id, "submitted": not dry_run,
                      "job": str((job_id() if callable(job_id) else None) or result),
                      "outputs": None if dry_run else outputs.run_dir}
            if dry_run:
                launch["built"] = built_job(result, options)
            return result, launch
    except BaseException as error:
        if ERROR_SHARE.stopped and isinstance(error, Exception):
            # The runner wraps the worker's exception in its own; say it plainly.
            raise RunStopped(ERROR_SHARE.stopped) from None
        raise
    return result, None


def build_and_run(options: PipelineOptions, outputs: OutputFolder, tool: str,
                  run_id: str, wait: bool, lean: bool, build, progress,
                  checked=None) -> tuple[Any, Any, Optional[dict[str, Any]]]:
    """A run's pipeline, as every command that runs one builds and runs it: a new
    pipeline for the options; `build(pipeline)` writes the graph and returns what the
    command needs of it (`built`); `checked(built)`, the checks that need the graph;
    then `run_pipeline` inside `progress(built)` (`lean`: the CLI's own local run,
    pipelines/run/lean.py). -> (built, result, what to return instead when nothing
    finishes here)."""
    with lean_run(lean) as graph_built:
        pipeline = new_pipeline(options)
        built = build(pipeline)
        graph_built()
        if checked is not None:
            checked(built)
        result, not_finished = run_pipeline(pipeline, options, outputs, tool, run_id,
                                            wait, progress(built))
    return built, result, not_finished


class RunStopped(Exception):
    """A local run stopped itself (`handler.ErrorShareGuard`): the CLI prints why
    and exits 4. On Dataflow the job fails with the same message in its log."""


def built_job(result, options: PipelineOptions) -> dict[str, Any]:
    """What a Dataflow dry run built: the top-level stages (and the composites' steps
    under them), the steps that read side inputs, how a job-wide quota is shared, and
    how workers are set up."""
    from apache_beam.options.pipeline_options import SetupOptions
    from apache_beam.options.pipeline_options import WorkerOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from codeclm_beam.options import ModelOptions
    from codeclm_beam.options import num_vms
    job = getattr(result, "job", None)
    proto = getattr(job, "proto_pipeline", None)
    stages: dict[str, list[str]] = {}
    side_inputs: list[str] = []
    if proto is not None:
        transforms = proto.components.transforms
        for root in proto.root_transform_ids:
            for top in transforms[root].subtransforms or [root]:
                stages[transforms[top].unique_name] = [
                    transforms[sub].unique_name.rsplit("/", 1)[-1]
                    for sub in transforms[top].subtransforms]
        for transform in transforms.values():
            if transform.spec.urn == "beam:transform:pardo:v1" and \
                    beam_runner_api_pb2.ParDoPayload.FromString(
                        transform.spec.payload).side_inputs:
                side_inputs.append(transform.unique_name)
    models, workers = options.view_as(ModelOptions), options.view_as(WorkerOptions)
    setup, vms = options.view_as(SetupOptions), num_vms(options)
    quota = {"vms": vms}
    for name, value in (("requests_per_minute", models.max_requests_per_minute),
                        ("tokens_per_minute", models.max_tokens_per_minute)):
        if value:
            quota[name] = {"job": value, "per_vm": round(value / vms, 2)}
    return {"stages": stages, "side_inputs": sorted(side_inputs), "quota": quota,
            "workers": {"machine_type": workers.machine_type,
                        "max_num_workers": workers.max_num_workers,
                        "sdk_container_image": workers.sdk_container_image,
                        "setup_file": setup.setup_file,
                        "requirements_file": setup.requirements_file,
                        "extra_packages": setup.extra_packages,
                        "sdk_location": setup.sdk_location}}


def billing_modes(*models) -> dict[str, str]:
    """How each model's calls are billed, by the model id its counters carry (a batch
    model's calls sent online by --batch_fallback carry their own, `metered_id`)."""
    modes = {model.metered_id(): model.billing_mode for model in models}
    for model in models:
        if model.billing_mode == BATCH and model.batch.fallback == ONLINE:
            modes[model.metered_id(ONLINE)] = ONLINE
    return modes


def estimated_cost(record: dict, method: tuple[ModelStage, ...] = METHOD) -> dict[str, Any]:
    """A run's estimated cost at the default prices (`codeclm-beam report --prices`
    re-prices it): as run, and with every vertex: model in each mode."""
    from codeclm_beam.pricing import run_cost
    cost = run_cost(record["model_calls"]["by_stage"], record.get("billing", {}))
    by_role: dict[str, Any] = {}
    role_of = roles(method)
    for row in cost["rows"]:
        role = role_of.get(row["stage"])
        if role:  # generate's stages; evaluate's stages are its own
            entry = by_role.setdefault(role, {"usd": 0.0, "modes": []})
            entry["usd"] = (None if row["usd"] is None or entry["usd"] is None
                            else round(entry["usd"] + row["usd"], 4))
            if row["mode"] not in entry["modes"]:
                entry["modes"].append(row["mode"])
    return {"usd": cost["usd"], "usd_paid_before": cost["usd_before"],
            "by_role": by_role, "by_mode": cost["by_mode"],
            "note": "estimates at published list prices; flex and batch bill half; "
                    "usd is what this run paid, usd_paid_before what the runs that "
                    "asked paid for the answers this one read from the cache"}


def run_header(tool: str, run_id: str, started: float) -> dict[str, Any]:
    """What ran and when: the first fields of a manifest or summary."""
    return {"tool": tool, "code_version": __version__, "run_id": run_id,
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "wall_time_seconds": round(time.time() - started, 2)}


def accounting(counters: RunCounters, max_iterations: int, from_metadata: bool,
               keep_unresolved: bool = False, num_metadata: int = 0,
               keep_contaminated_seeds: bool = False,
               method: tuple[ModelStage, ...] = METHOD) -> dict[str, Any]:
    """Where every seed and every candidate went, with the identities checked."""
    flow, dead = counters.flow, counters.dead_letter
    checks = {}
    seeds: dict[str, Any] = {}
    if not from_metadata:
        seeds = {"rows_read": flow(m.rows_read("read_seeds")), "seeds": flow(m.SEEDS),
                 "duplicates_dropped": flow(m.duplicates("read_seeds")),
                 "dead_letter": dead("read_seeds"),
                 "encoded": flow(m.METADATA), "encode_dead_letter": dead("encode")}
        if flow(m.NOT_PREVIEWED):
            seeds["not_previewed"] = flow(m.NOT_PREVIEWED)
        if flow(m.NOT_SAMPLED):
            seeds["not_sampled"] = flow(m.NOT_SAMPLED)
        contaminated = flow(m.SEEDS_CONTAMINATED)
        if contaminated:
            seeds["contaminated"] = contaminated
            seeds["contaminated_encoded"] = keep_contaminated_seeds
        checks["rows = seeds + duplicates + dead letters"] = (
            seeds["rows_read"] == seeds["seeds"] + seeds["duplicates_dropped"]
            + seeds["dead_letter"])
        checks["seeds = metadata + encode dead letters (+ not previewed, + not sampled, "
               "+ contaminated left out)"] = (
            seeds["seeds"] == seeds["encoded"] + seeds["encode_dead_letter"]
            + flow(m.NOT_PREVIEWED) + flow(m.NOT_SAMPLED)
            + (0 if keep_contaminated_seeds else contaminated))
    else:
        seeds = {"rows_read": flow(m.rows_read("read_metadata")),
                 "metadata": flow(m.USER_METADATA),
                 "duplicates_dropped": flow(m.duplicates("read_metadata")),
                 "dead_letter": dead("read_metadata")}
        if flow(m.NOT_PREVIEWED):
            seeds["not_previewed"] = flow(m.NOT_PREVIEWED)
        checks["rows = metadata + duplicates + dead letters"] = (
            seeds["rows_read"] == seeds["metadata"] + seeds["duplicates_dropped"]
            + seeds["dead_letter"])
    pool = {"entries": flow(m.METADATA_POOL), "asked": num_metadata,
            "note": ("every distinct (use case, skills) of the seeds is kept, as the "
                     "method does: the pool is larger than --num_metadata"
                     if flow(m.METADATA_POOL) > num_metadata else ""),
            "rubric_sets": flow(m.RUBRIC_SETS),
            "rubrics_dead_letter": dead("rubrics"),
            "decode_dead_letter": dead("decode")}
    checks["pool = rubric sets + rubrics dead letters"] = (
        pool["entries"] == pool["rubric_sets"] + pool["rubrics_dead_letter"])
    # of a round's candidates, "fresh" are basic instructions drawn from the reserve
    rounds = [{"round": r, **{what: counters.in_round(r, what) for what in m.ROUND_COUNTS}}
              for r in range(1, max_iterations + 1)]
    # A round's stage loses a candidate to a dead letter; one that makes several calls
    # for it (the judge, in both orders) counts the candidate whose set is incomplete,
    # and that set must have its dead letters: one to `calls` of them, each of an
    # incomplete set. A set incomplete with no dead letter lost a call's answer inside
    # the runner, which the count alone would pass as a dead letter.
    lost = 0
    for stage in method:
        if not stage.in_round:
            continue
        if stage.calls == 1:
            lost += dead(stage.name)
            continue
        incomplete = flow(m.incomplete(stage.name))
        lost += incomplete
        checks[f"{stage.name}: incomplete <= dead letters <= {stage.calls} x "
               f"incomplete"] = incomplete <= dead(stage.name) <= stage.calls * incomplete
    kept_total = sum(r["kept"] for r in rounds)
    last = rounds[-1]["undecided"] if rounds else 0
    not_needed = sum(r["not_needed"] for r in rounds)
    reserve_unused = flow(m.RESERVE_UNUSED)
    screening = screening_counts(counters, rounds, method)
    candidates = {"basic_instructions": flow(m.BASIC_INSTRUCTIONS),
                  "kept": kept_total, "unresolved_after_last_round": last,
                  "not_needed": not_needed, "reserve_unused": reserve_unused,
                  "duplicates": screening["duplicates"]["before_judging"],
                  "contaminated": screening["contaminated"]["before_judging"],
                  "lost_to_dead_letters": lost,
                  "examples_written": flow(m.EXAMPLES), "surplus": flow(m.SURPLUS),
                  "pairs_duplicates": screening["duplicates"]["final_pairs"],
                  "pairs_contaminated": screening["contaminated"]["final_pairs"],
                  "rounds": rounds}
    checks["basic = kept + unresolved + not needed + unused reserve + duplicates + "
           "contaminated + dead letters"] = (
        candidates["basic_instructions"]
        == kept_total + last + not_needed + reserve_unused + candidates["duplicates"]
        + candidates["contaminated"] + lost)
    kept_all = kept_total + (last if keep_unresolved else 0)
    checks["kept = examples + surplus + duplicate and contaminated pairs"] = (
        candidates["examples_written"] + candidates["surplus"]
        + candidates["pairs_duplicates"] + candidates["pairs_contaminated"] == kept_all)
    return {"seeds": seeds, "metadata_pool": pool, "candidates": candidates,
            "screening": screening,
            "dead_letters_by_stage": counters.dead_letters(), "checks": checks,
            "balanced": all(checks.values())}


def screening_counts(counters: RunCounters, rounds: list[dict],
                     method: tuple[ModelStage, ...] = METHOD) -> dict[str, Any]:
    """What the screens removed, before judging (each would have cost a judged
    candidate's calls) and from the final pairs (paid already)."""
    duplicates = sum(r["duplicate"] for r in rounds)
    contaminated = sum(r["contaminated"] for r in rounds)
    return {"duplicates": {"before_judging": duplicates,
                           "final_pairs": counters.flow(m.PAIRS_DUPLICATE)},
            "contaminated": {"before_judging": contaminated,
                             "final_pairs": counters.flow(m.PAIRS_CONTAMINATED)},
            "benchmark_rows_compared_whole": counters.flow(m.BENCHMARK_SHORT_ROWS),
            "reference_buckets": counters.reference_buckets(),
            "calls_saved": (duplicates + contaminated) * calls_per(JUDGED, method)}


def judge_note(accounting_: dict, threshold: float) -> Optional[str]:
    """A warning when no judged candidate was kept by the gap rule: the pairs, if
    any, are unresolved ones kept anyway, and the run says so before its totals."""
    cand = accounting_["candidates"]
    judged = sum(r["candidates"] for r in cand["rounds"])
    if not judged or cand["kept"]:
        return None
    kept = (f"the {cand['examples_written']} pairs are unresolved candidates kept by "
            "--keep_unresolved, not chosen by contrastive filtering"
            if cand["examples_written"] else "nothing was kept")
    return (f"the judge separated none of the {judged} judged candidates (every score "
            f"gap within the threshold {threshold:g}): {kept}; a judge this weak or "
            "this unsure cannot filter, see the score gaps in the report")


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
                       "within the threshold after the last round (rejected/; "
                       "--keep_unresolved keeps the better answer of each)")
    screened = (cand.get("duplicates", 0) + cand.get("contaminated", 0)
                + cand.get("pairs_duplicates", 0) + cand.get("pairs_contaminated", 0))
    if screened and cand["reserve_unused"] == 0:
        reasons.append(f"{screened} were removed as duplicates or contaminated "
                       "(rejected/), more than the reserve and the rounds made up for")
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
