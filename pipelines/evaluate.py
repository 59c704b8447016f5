"""`codeclm-beam evaluate`: Capacity Recovery Ratio of candidate models against a
reference model on benchmark files, as in the CodecLM paper."""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
import uuid
from typing import Any, Optional

import apache_beam as beam
from apache_beam.transforms.error_handling import ErrorHandler
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam import metrics
from codeclm_beam.metrics import RunCounters
from codeclm_beam.pipelines.run.manifest import billing_modes
from codeclm_beam.pipelines.run.progress import progress_for
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.options import ModelOptions
from codeclm_beam.pipelines.run.args import RunOptions
from codeclm_beam.options import model_configs
from codeclm_beam.pipelines.run import manifest as manifest_lib
from codeclm_beam.pipelines.run import preflight as preflight_lib
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.commit import run_in_folder
from codeclm_beam.sinks import WriteDeadLetters
from codeclm_beam.sinks import WriteJsonl
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir
from codeclm_beam.pipelines.report.render import markdown_table
from codeclm_beam.pipelines.report.render import write_report
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.answer_options import AnswerOptions
from codeclm_beam.pipelines.run.args import is_dry_run
from codeclm_beam.transforms.evaluate import FAILED
from codeclm_beam.transforms.evaluate import JudgeAgainstReference
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.transforms.evaluate import BenchmarkFiles
from codeclm_beam.transforms.evaluate import EVAL_JUDGE
from codeclm_beam.transforms.evaluate import ReadBenchmarks
from codeclm_beam.transforms.evaluate import READ_STAGE
from codeclm_beam.options import COUNT
from codeclm_beam.options import SHARE

OUTCOMES = ("win", "tie", "loss")
# W/T/L and F (failed: no answer or judgement could be had for the item).
COUNTED = (*OUTCOMES, FAILED)


class EvaluateOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("evaluate")
        group.add_argument("--benchmark", action="append", default=[],
                           help="Benchmark file (JSONL; Evol-Instruct, Vicuna, "
                                "Self-Instruct, Koala layouts detected). Repeatable.")
        group.add_argument("--candidate_model", action="append", default=[],
                           help="Model URI to evaluate (repeatable: one row each).")
        group.add_argument("--reference_model", default=None,
                           help="Model URI compared against (default: --strong_model).")
        group.add_argument("--bootstrap_samples", type=COUNT, default=2000,
                           help="Resamples for the CRR-difference confidence interval.")
        group.add_argument("--allow_seed_items", action="store_true", default=False,
                           help="Evaluate on items `split` marked as seeds.")
        group.add_argument("--evaluate_instruction_field", default=None,
                           help="Dotted path of the instruction in a generic JSONL file.")
        group.add_argument("--max_failed_share", type=SHARE, default=0.0,
                           help="Exit with status 3 when a larger share of a "
                                "candidate's items failed (no answer or judgement).")


def crr(counts: dict[str, int]) -> Optional[float]:
    """(W + T) / (W + T + L): failed items are not in the denominator (they are
    reported beside it, and `--max_failed_share` bounds them)."""
    total = sum(counts.get(k, 0) for k in OUTCOMES)
    return 100.0 * (counts.get("win", 0) + counts.get("tie", 0)) / total if total else None


def _cell(counts) -> dict[str, Any]:
    judged = sum(counts[k] for k in OUTCOMES)
    return {**{k: counts[k] for k in COUNTED}, "judged": judged,
            "total": judged + counts[FAILED], "crr": _round(crr(counts))}


def bootstrap_difference(a: list[str], b: list[str], samples: int,
                         seed: int) -> dict[str, float]:
    """CRR(b) - CRR(a) over paired items, with a 95% percentile bootstrap interval."""
    recovered_a = np.array([o != "loss" for o in a], dtype=float)
    recovered_b = np.array([o != "loss" for o in b], dtype=float)
    diff = 100.0 * (recovered_b.mean() - recovered_a.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    boot = 100.0 * (recovered_b[idx].mean(axis=1) - recovered_a[idx].mean(axis=1))
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"difference": round(float(diff), 2), "ci95_low": round(float(low), 2),
            "ci95_high": round(float(high), 2), "items": len(a)}


def summarize(judgements: list[dict], candidates: list[str], samples: int,
              seed: int) -> dict[str, Any]:
    by_cell: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    outcomes: dict[tuple[str, str], dict[str, str]] = collections.defaultdict(dict)
    for j in judgements:
        by_cell[(j["candidate_model"], j["benchmark"])][j["outcome"]] += 1
        outcomes[(j["candidate_model"], j["benchmark"])][j["item_id"]] = j["outcome"]
    benchmarks = sorted({b for _, b in by_cell})
    rows = []
    for model in candidates:
        cells = {}
        overall = collections.Counter()
        for bench in benchmarks:
            counts = by_cell.get((model, bench), collections.Counter())
            overall.update(counts)
            cells[bench] = _cell(counts)
        rows.append({"candidate_model": model, "benchmarks": cells,
                     "overall": _cell(overall)})
    differences = []
    for i, base in enumerate(candidates):
        for other in candidates[i + 1:]:
            for bench in benchmarks:
                a, b = outcomes[(base, bench)], outcomes[(other, bench)]
                # Paired over the items both candidates had judged.
                shared = sorted(k for k in set(a) & set(b)
                                if FAILED not in (a[k], b[k]))
                if shared:
                    differences.append({
                        "benchmark": bench, "from": base, "to": other,
                        **bootstrap_difference([a[k] for k in shared],
                                               [b[k] for k in shared], samples, seed)})
    return {"benchmarks": benchmarks, "candidates": rows, "differences": differences}


def _round(value):
    return None if value is None else round(value, 2)


def judge_independence(judge: ModelConfig, reference: ModelConfig,
                       candidates: list[ModelConfig]) -> str:
    """How the judge stands to the contestants; "self-judged" wherever a CRR is shown
    when it is one of them (the paper's evaluation judge was a separate model)."""
    roles = (["the reference"] if judge.identity == reference.identity else []) + [
        f"candidate {c.spec.uri}" for c in candidates if c.identity == judge.identity]
    if roles:
        return "self-judged: the judge is also " + " and ".join(roles)
    return "independent judge: neither the reference nor a candidate"


def failed_shares(summary: dict) -> dict[str, float]:
    return {row["candidate_model"]: (row["overall"][FAILED] / row["overall"]["total"]
                                     if row["overall"]["total"] else 0.0)
            for row in summary["candidates"]}


@dataclasses.dataclass
class EvaluatePlan:
    benchmarks: BenchmarkFiles
    candidates: list[str]
    reference: str
    judge: str
    run_id: str
    judge_independence: str
    settings: dict[str, Any]
    answering: list[ModelConfig]  # the reference and the candidates
    billing: dict[str, str]  # model id -> how its calls are billed
    judging: ModelConfig


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                   out: Optional[str] = None,
                   run_id: Optional[str] = None) -> EvaluatePlan:
    """The evaluate pipeline, writing its outputs under `out` (default --output_dir)."""
    opts = options.view_as(EvaluateOptions)
    model_opts = options.view_as(ModelOptions)
    output_dir = options.view_as(RunOptions).output_dir
    out = out or output_dir
    if not opts.benchmark:
        raise ConfigurationError("give at least one --benchmark FILE")
    run_id = run_id or uuid.uuid4().hex[:12]
    # The files first: a layout that cannot be told is refused before any model is
    # resolved (the embedded model's weights, a custom class).
    benchmarks = BenchmarkFiles.detect(opts.benchmark, opts.evaluate_instruction_field,
                                       opts.allow_seed_items)
    answers = options.view_as(AnswerOptions)
    models = model_configs(options, FileSystems.join(output_dir, "cache"), run_id)
    reference = models["strong"].replace(uri=opts.reference_model or models["strong"].uri)
    judge = models["judge"].replace(uri=model_opts.judge_model or reference.uri)
    candidate_uris = opts.candidate_model or [model_opts.target_model]
    candidates = [models["target"].replace(uri=uri) for uri in candidate_uris]
    seen: dict[str, str] = {}
    for candidate in candidates:
        if candidate.identity in seen:
            raise ConfigurationError(
                f"--candidate_model {candidate.spec.uri} and {seen[candidate.identity]} "
                f"are the same model ({candidate.identity}): their answers would be one "
                "model's. If the weights differ behind one name and address, tell them "
                "apart with a tag: URI#rev=NAME")
        seen[candidate.identity] = candidate.spec.uri

    with ErrorHandler(WriteDeadLetters(out)) as dead_letters:
        (pipeline
         | "ReadBenchmarks" >> ReadBenchmarks(benchmarks).with_error_handler(dead_letters)
         | "JudgeAgainstReference" >> JudgeAgainstReference(
             candidates, reference, judge,
             answers=GenerationSettings(answers.answer_temperature,
                                        answers.max_output_tokens),
             judging=dataclasses.replace(EVAL_JUDGE, settings=dataclasses.replace(
                 EVAL_JUDGE.settings, temperature=answers.judge_temperature)),
             run_seed=model_opts.seed).with_error_handler(dead_letters)
         | "WriteJudgements" >> WriteJsonl(out, "judgements"))
    settings = {
        "answer_temperature": answers.answer_temperature,
        "max_output_tokens": answers.max_output_tokens,
        "judge_temperature": answers.judge_temperature,
        "thinking": {"reference": reference.thinking, "candidates": candidates[0].thinking,
                     "judge": judge.thinking},
        "max_failed_share": opts.max_failed_share,
    }
    return EvaluatePlan(benchmarks, [c.spec.uri for c in candidates], reference.spec.uri,
                        judge.spec.uri, run_id,
                        judge_independence(judge, reference, candidates), settings,
                        [reference, *candidates],
                        billing_modes(reference, judge, *candidates), judge)


def preflight(options: PipelineOptions, plan: EvaluatePlan) -> None:
    """Everything that can be checked before a file is written or a call is made
    (layouts and model identities were checked when the pipeline was built)."""
    offline = is_dry_run(options)
    if not offline:
        reference, *candidates = plan.answering
        preflight_lib.check_models_reachable(
            [("strong", reference)] + [("candidate", c) for c in candidates]
            + [("judge", plan.judging)])
    preflight_lib.check_output_budget("--max_output_tokens",
                                      options.view_as(AnswerOptions).max_output_tokens,
                                      plan.answering)
    for path in plan.benchmarks.layouts:
        if path.startswith("gs://") and offline:
            continue
        preflight_lib.check_rows(path, "--benchmark", plan.benchmarks.items_of(path))


def projected_calls(candidates: int, counters: RunCounters) -> int:
    """The calls this run makes, for the progress display's ETA: per item read, one
    reference answer, and per candidate an answer and two judgements."""
    items = (counters.flow(metrics.rows_read(READ_STAGE))
             - counters.dead_letter(READ_STAGE)
             - counters.flow(metrics.duplicates(READ_STAGE)))
    return items * (1 + 3 * candidates)


def run(argv: Optional[list[str]] = None, options: Optional[PipelineOptions] = None,
        wait: bool = True, lean: bool = False) -> dict[str, Any]:
    """Runs `evaluate` and returns its summary (also committed to OUTPUT_DIR); `lean`
    as for `generate.run`."""
    options = options or PipelineOptions(argv)
    opts = options.view_as(EvaluateOptions)
    run_opts = options.view_as(RunOptions)
    output_dir = run_opts.output_dir
    offline = is_dry_run(options)  # a dry run reads no gs:// input, writes nothing
    preflight_lib.check_gcs_paths(
        [*(("--benchmark", path) for path in opts.benchmark), ("--output_dir", output_dir),
         ("--cache_dir", options.view_as(ModelOptions).cache_dir),
         ("--batch_dir", options.view_as(ModelOptions).batch_dir)], options, offline)
    run_id = uuid.uuid4().hex[:12]
    outputs = OutputFolder(output_dir, run_id, "summary.json", run_opts.force,
                           cache_dir=options.view_as(ModelOptions).cache_dir)

    def work():
        started = time.time()
        plan, result, not_finished = manifest_lib.build_and_run(
            options, outputs, "codeclm-beam evaluate", run_id, wait, lean,
            build=lambda pipeline: build_pipeline(pipeline, options, outputs.run_dir,
                                                  run_id),
            progress=lambda plan: progress_for(options, None, functools.partial(
                projected_calls, len(plan.candidates))),
            checked=lambda plan: preflight(options, plan))
        if not_finished:
            return not_finished
        judgements = read_jsonl_dir(FileSystems.join(outputs.run_dir, "judgements"))
        summary = summarize(judgements, plan.candidates, opts.bootstrap_samples,
                            options.view_as(ModelOptions).seed)
        counters = RunCounters.from_result(result)
        summary.update({
            **manifest_lib.run_header("codeclm-beam evaluate", plan.run_id, started),
            "layouts": plan.benchmarks.layout_names,
            "splits": dict(plan.benchmarks.splits),
            "models": {"candidates": plan.candidates, "reference": plan.reference,
                       "judge": plan.judge},
            "judge_independence": plan.judge_independence,
            "settings": plan.settings,
            "model_calls": counters.model_calls(),
            "billing": plan.billing,
            "dead_letters_by_stage": counters.dead_letters(),
            # Repeated questions of a benchmark, judged once each.
            "duplicates_dropped": counters.flow(metrics.duplicates(READ_STAGE)),
        })
        summary["cost"] = manifest_lib.estimated_cost(summary)
        summary["judged"] = sum(1 for j in judgements if j.get("outcome") != FAILED)
        outputs.keep_previous_if_fewer(
            summary, f"made {summary['judged']} judgements", summary["judged"],
            lambda previous: previous.get("judged"), "judgements",
            run_opts.replace_with_fewer)
        outputs.write_text("crr.md", markdown_table(summary), "text/markdown")
        if not run_opts.no_report:
            summary["report"] = write_report(outputs, summary)
        outputs.commit(summary)
        return summary
    return run_in_folder(outputs, not offline, work)
