"""The `codeclm-beam` command.

    codeclm-beam generate --seeds seeds.jsonl --output_dir out [Beam flags...]

Flags the subcommand does not know are Beam's (`--runner`, `--project`, ...), passed
through to `PipelineOptions` untouched.
"""
from __future__ import annotations

import argparse
import collections
import errno
import functools
import importlib
import logging
import shlex
import sys
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.args import unknown_message
from codeclm_beam.options import ModelOptions
from codeclm_beam.pipelines.run.args import RunOptions
from codeclm_beam.version import __version__


def _options_parser(prog: str, description: str, *views) -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog=prog, description=description,
        epilog="Any other flag is a Beam pipeline option (--runner, --project, "
               "--region, --temp_location, --direct_num_workers, ...).")
    for view in views:
        view._add_argparse_args(parser)
    return parser


def parse_pipeline_flags(prog: str, description: str, views: tuple, argv: list[str],
                         required: tuple[str, ...], missing: str) -> None:
    """Checks a pipeline command's flags (--help exits here): every flag neither we nor
    Beam know is refused, and one of the `required` options must be given."""
    parser = _options_parser(prog, description, *views)
    known, _ = parser.parse_known_args(argv)
    refuse_unknown_options(parser, argv)
    if not any(getattr(known, name) for name in required):
        parser.error(missing)


def refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Flags that neither this command nor any Beam pipeline option knows are refused
    before anything runs (Beam would only log them and run with the defaults); Beam's
    flags (`--runner`, `--project`, ...) pass through to the runner."""
    # Beam's parser of every pipeline option, as Beam builds it: handed to the
    # public add_extra_args_fn hook (Beam has no public accessor for it).
    parsers = []
    PipelineOptions(argv).get_all_options(add_extra_args_fn=parsers.append)
    every = parsers[0]
    _, unknown = every.parse_known_args(argv)
    if unknown:
        parser.error(unknown_message(unknown, every))


def _usd(value) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _summary(manifest: dict) -> str:
    from codeclm_beam.pipelines.run.manifest import judge_note
    acc = manifest["accounting"]
    cand = acc["candidates"]
    calls = manifest["model_calls"]["totals"]
    lines = [
        f"codeclm-beam generate finished in {manifest['wall_time_seconds']} s",
        f"  models: strong={manifest['models']['strong']} "
        f"target={manifest['models']['target']} judge={manifest['models']['judge']}",
    ]
    if "seeds" in acc["seeds"]:
        s = acc["seeds"]
        lines.append(f"  seeds: {s['rows_read']} rows, {s['seeds']} unique, "
                     f"{s['duplicates_dropped']} duplicates, {s['dead_letter']} bad rows, "
                     f"{s['encoded']} encoded")
        if s.get("not_sampled"):
            lines.append(f"    {s['seeds'] - s['not_sampled']} of the {s['seeds']} seeds "
                         "encoded: a seeded sample the pool's size (--max_seeds N or "
                         "all to change it)")
        if s.get("contaminated"):
            lines.append(f"    {s['contaminated']} seeds match a --decontaminate file "
                         "(contaminated_seeds/): "
                         + ("encoded anyway (--keep_contaminated_seeds)"
                            if s["contaminated_encoded"] else "left out of encoding"))
    pool = acc["metadata_pool"]
    lines.append(f"  metadata pool: {pool['entries']} entries ({pool['asked']} asked), "
                 f"{pool['rubric_sets']} rubric sets")
    if pool["note"]:
        lines.append(f"    {pool['note']}")
    lines.append(f"  basic instructions: {cand['basic_instructions']}")
    for r in cand["rounds"]:
        if r["candidates"]:
            # candidates = removed + kept + within threshold + lost to dead letters;
            # "not needed" are some of those within threshold, not more of them.
            removed = r["duplicate"] + r["contaminated"]
            lines.append(f"    round {r['round']}: {r['candidates']} candidates "
                         f"({r['fresh']} fresh from the reserve): "
                         + (f"{removed} removed before judging, " if removed else "")
                         + f"{r['kept']} kept, {r['undecided']} within threshold"
                         + (f" (of them {r['not_needed']} not needed)"
                            if r["not_needed"] else ""))
    unresolved = cand["unresolved_after_last_round"]
    if manifest["options"].get("keep_unresolved"):
        verdict = f"{cand['kept']} by the gap rule, {unresolved} unresolved kept anyway"
    else:
        verdict = f"{cand['kept']} by the gap rule; {unresolved} rejected after the last round"
    lines.append(f"  kept pairs: {cand['examples_written']} ({verdict}; surplus "
                 f"{cand['surplus']}); "
                 f"dead letters: {sum(acc['dead_letters_by_stage'].values())}")
    delivery = manifest["delivery"]
    lines.append(f"  asked {delivery['asked']}, delivered {delivery['delivered']}")
    note = judge_note(acc, float(manifest["options"].get("threshold") or 3))
    if note:
        lines.append(f"    note: {note}")
    if "gap" in delivery:
        lines.append(f"    short by {delivery['gap']}: {delivery['reason']}")
        lines.append(f"    to close the gap: {delivery['to_close_the_gap']}")
    lines.append(f"  model calls: {calls.get('requests', 0)} requests, "
                 f"{calls.get('cache_hits', 0)} cache hits, "
                 f"{calls.get('truncated', 0)} truncated; tokens: "
                 f"{calls.get('prompt_tokens', 0)} prompt + "
                 f"{calls.get('completion_tokens', 0)} visible output + "
                 f"{calls.get('thoughts_tokens', 0)} thoughts")
    cost = manifest.get("cost")
    if cost:
        lines.append(f"  estimated cost: {_usd(cost['usd'])} paid now (vertex: models "
                     + ", ".join(f"{mode} {_usd(v)}" for mode, v in cost["by_mode"].items())
                     + ")")
        if calls.get("cache_hits"):
            lines.append(f"    and {_usd(cost.get('usd_paid_before'))} paid before: "
                         f"{calls['cache_hits']} answers read from the cache, paid for "
                         "by the run that asked")
    lines.append(f"  accounting balanced: {acc['balanced']}")
    if "tailoring" in manifest:
        t = manifest["tailoring"]
        lines.append(f"  tailoring: use-case JS divergence {t['use_case_js_divergence']} "
                     f"bits, seed-skill coverage {t['seed_skill_coverage']}")
    if "report" in manifest:
        lines.append(f"  report: {manifest['report']}")
    lines.append(f"  outputs: {manifest['outputs']['examples']} (and rejected/, "
                 "dead_letter/, seed_metadata/, metadata_pool/, rubrics/, manifest.json "
                 "beside it)")
    lines.append(f"  to cost a larger run from this one: codeclm-beam plan "
                 f"{shlex.quote(manifest['options']['output_dir'])} --num_examples N")
    return "\n".join(lines)


def _shortened(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _judged(record: dict) -> str:
    """"judged S vs T" for a pair or candidate the judge scored, else ""."""
    if record.get("strong_score") is None or record.get("target_score") is None:
        return ""
    return f"judged {record['strong_score']} vs {record['target_score']}"


def _preview_summary(manifest: dict) -> str:
    preview, calls = manifest["preview"], manifest["model_calls"]["totals"]
    acc, output_dir = manifest["accounting"], manifest["options"]["output_dir"]
    seeds = acc["seeds"]
    taken = seeds.get("encoded", seeds.get("metadata", 0))
    lines = [f"codeclm-beam generate --preview: {len(preview['pairs'])} of "
             f"{manifest['options']['preview']} pairs in {manifest['wall_time_seconds']} s "
             f"from {taken} seeds (of {taken + seeds.get('not_previewed', 0)}), a pool of "
             f"{acc['metadata_pool']['entries']} entries; {calls.get('requests', 0)} model "
             f"requests, {calls.get('cache_hits', 0)} cache hits, cost "
             f"{_usd(manifest['cost']['usd'])}"]
    for number, pair in enumerate(preview["pairs"], start=1):
        judged = _judged(pair)
        lines += [f"  [{number}] {_shortened(pair.get('instruction', ''))}",
                  f"      answer ({pair.get('response_source', '?')}"
                  + (f", {judged}" if judged else "") + f"): "
                  f"{_shortened(pair.get('response', ''))}"]
    missing = manifest["options"]["preview"] - len(preview["pairs"])
    if missing > 0 and preview["rejected"]:
        lines.append(f"  not kept ({missing} short), the first rejected candidates:")
        for candidate in preview["rejected"][:missing]:
            judged = _judged(candidate)
            lines.append(f"    {candidate.get('reason', '?')}: "
                         f"{_shortened(candidate.get('instruction', ''))}"
                         + (f" ({judged})" if judged else ""))
    within = sum(c.get("reason") == "within_threshold" for c in preview["rejected"])
    if missing > 0 and within and not manifest["options"].get("keep_unresolved"):
        lines.append(f"  {within} candidates were still within the threshold after the "
                     "last round: a judge that cannot tell the answers apart (one model "
                     "as strong and target, as the embedded default is) keeps nothing; "
                     "--keep_unresolved keeps the better answer of each, as `make demo` "
                     "does")
    dead = collections.Counter(f"{d.get('stage', '?')}: {d.get('reason', 'error')}"
                               for d in preview["dead_letters"])
    lines.append(f"  rejected candidates: {len(preview['rejected'])}; dead letters: "
                 + (", ".join(f"{n} at {k}" for k, n in sorted(dead.items())) or "none"))
    lines.append(f"  nothing was written to {output_dir} but its cache (the full run "
                 "reuses these answers); run the same command without --preview")
    return "\n".join(lines)


def _launch_summary(launch: dict) -> str:
    if not launch["submitted"]:
        built = launch.get("built", {})
        lines = [f"{launch['tool']}: job built and validated, not submitted (dry run); "
                 f"run id {launch['run_id']}", "  stages:"]
        for stage, steps in built.get("stages", {}).items():
            lines.append(f"    {stage}" + (f": {', '.join(steps)}" if steps else ""))
        side_inputs = built.get("side_inputs", [])
        where = collections.Counter("/".join(name.split("/")[:2]) for name in side_inputs)
        lines.append(f"  side inputs read by {len(side_inputs)} steps"
                     + (": " + ", ".join(f"{k} {v}" for k, v in sorted(where.items()))
                        if where else ""))
        quota = built.get("quota", {})
        shares = [f"{name.replace('_', ' ')}: {q['job']:g} for the job, {q['per_vm']:g} "
                  "per VM" for name, q in quota.items() if isinstance(q, dict)]
        lines.append(f"  quota over {quota.get('vms', 1)} VM(s): "
                     + ("; ".join(shares) or "none set (--max_requests_per_minute)"))
        workers = {k: v for k, v in built.get("workers", {}).items() if v}
        lines.append("  workers: " + (", ".join(f"{k} {v}" for k, v in workers.items())
                                      or "Dataflow's defaults"))
        return "\n".join(lines)
    return (f"{launch['tool']}: job submitted ({launch['job']}); its outputs will stay "
            f"under {launch['outputs']} (a launch that does not wait does not move them "
            "into place)")


def generate(argv: list[str]) -> int:
    from codeclm_beam.pipelines.generate import OPTION_VIEWS
    from codeclm_beam.pipelines.generate import run
    parse_pipeline_flags(
        "codeclm-beam generate", "Generate CodecLM instruction-response pairs.",
        OPTION_VIEWS, argv, ("seeds", "metadata"), "give --seeds FILE (or --metadata FILE)")
    manifest = run(options=PipelineOptions(argv), lean=True)
    if "accounting" not in manifest:  # a dry run, or a launch that does not wait
        print(_launch_summary(manifest))
        return 0
    if "preview" in manifest:
        print(_preview_summary(manifest))
        return 0 if manifest["preview"]["pairs"] else 3
    print(_summary(manifest))
    delivery = manifest["delivery"]
    if not delivery["delivered"] and delivery["asked"]:
        failed = sum(manifest["accounting"]["dead_letters_by_stage"].values())
        print("codeclm-beam generate: delivered nothing; " + (
            f"every element that failed is in {manifest['outputs']['dead_letter']} with "
            "its reason" if failed else "the judge kept no candidate (see rejected/ and "
            "--keep_unresolved)"), file=sys.stderr)
        return 3
    return 0 if manifest["accounting"]["balanced"] else 3


def evaluate(argv: list[str]) -> int:
    from codeclm_beam.pipelines.evaluate import EvaluateOptions
    from codeclm_beam.pipelines.run.answer_options import AnswerOptions
    from codeclm_beam.pipelines.evaluate import failed_shares
    from codeclm_beam.pipelines.report.render import markdown_table
    from codeclm_beam.pipelines.evaluate import run
    parse_pipeline_flags(
        "codeclm-beam evaluate", "Capacity Recovery Ratio of candidate models against a "
        "reference model on benchmark files.",
        (EvaluateOptions, AnswerOptions, RunOptions, ModelOptions), argv,
        ("benchmark",), "give --benchmark FILE (repeatable)")
    summary = run(options=PipelineOptions(argv), lean=True)
    if "candidates" not in summary:  # a dry run, or a launch that does not wait
        print(_launch_summary(summary))
        return 0
    print(markdown_table(summary))
    if summary.get("duplicates_dropped"):
        print(f"codeclm-beam evaluate: {summary['duplicates_dropped']} benchmark rows "
              "repeat a question of their benchmark (same text, whitespace and case "
              "aside): each question was judged once", file=sys.stderr)
    limit = summary["settings"]["max_failed_share"]
    over = {model: share for model, share in failed_shares(summary).items()
            if share > limit}
    for model, share in over.items():
        print(f"codeclm-beam evaluate: {share:.1%} of the items of {model} failed (no "
              f"answer or judgement; see dead_letter/), over --max_failed_share "
              f"{limit:g}", file=sys.stderr)
    return 3 if over else 0


# The other subcommands, imported when used: the CLI starts fast, and `jobs` never
# imports Beam's inference module.
SUBCOMMANDS = {"split": "split:split_command", "report": "report:report_command",
               "plan": "plan:plan_command", "prompts": "prompts:prompts_command",
               "show": "show:show_command", "jobs": "jobs:jobs_command",
               "yaml": "yaml_run:yaml_command", "tune": "tune:tune_command",
               "experiment": "experiment:experiment_command",
               "push": "push:push_command"}


def _subcommand(name: str, argv: list[str]) -> int:
    module, function = SUBCOMMANDS[name].split(":")
    return getattr(importlib.import_module(f"codeclm_beam.pipelines.commands.{module}"),
                   function)(argv)


COMMANDS = {"generate": generate, "evaluate": evaluate,
            **{name: functools.partial(_subcommand, name) for name in SUBCOMMANDS}}


class _BeamNoise(logging.Filter):
    """Warnings Beam logs on the root logger that say nothing about a run: its
    inference module imports `resource` in one try-block with its ModelManager, which
    needs torch, so without torch it warns that `resource` is missing at every model
    load, even on Linux; Beam YAML warns at import about each TensorFlow transform it
    cannot load."""

    NOISE = ("Resource module is not available", "Could not load ML transform module")

    def filter(self, record: logging.LogRecord) -> bool:
        # Ctrl-C: Beam logs the interrupted bundle's traceback before it re-raises;
        # the CLI says in one line what happened and how to resume.
        if record.exc_info and _is_interrupt(record.exc_info[1]):
            return False
        return not record.getMessage().startswith(self.NOISE)


def setup_logging(level: int = logging.WARNING) -> None:
    """The CLI's own logging, set up in its process only: a library import changes
    no logger. httpx logs every request at INFO, one line per model call."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if level < root.getEffectiveLevel():  # a launcher that asks for more (INFO)
        root.setLevel(level)
    for handler in root.handlers:
        if not any(isinstance(f, _BeamNoise) for f in handler.filters):
            handler.addFilter(_BeamNoise())
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _chain(error: Optional[BaseException]):
    """An exception and those it was raised from or during (Beam wraps a worker's
    exception in its own)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _storage_fault(error: BaseException) -> Optional[str]:
    """One line for a full disk or a folder that cannot be written, wherever in the
    run it surfaced."""
    for seen in _chain(error):
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk is full ({seen.filename or seen.strerror})"
        if isinstance(seen, PermissionError):
            return f"cannot write {seen.filename or ''} ({seen.strerror})".replace("  ", " ")
        text = str(seen)
        if "No space left on device" in text:
            return "the disk is full"
    return None


def _is_interrupt(error: BaseException) -> bool:
    """Ctrl-C inside a running pipeline: Beam's runner re-raises it as a RuntimeError
    naming it ("KeyboardInterrupt [while running 'Stage']")."""
    return any(isinstance(seen, KeyboardInterrupt) or "KeyboardInterrupt" in str(seen)[:200]
               for seen in _chain(error))


def _interrupted(command: str) -> int:
    print(f"codeclm-beam {command}: interrupted. Nothing of this run was made current: "
          "the output folder holds what it held before. Run the same command again to "
          "resume: the answers already paid for are read from the cache, not asked "
          "again.", file=sys.stderr)
    return 130  # the shell's code for a process ended by SIGINT


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = SuggestingParser(
        prog="codeclm-beam",
        description="CodecLM tailored synthetic instruction data on Apache Beam.")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="generate: seeds -> instruction-response pairs; "
                             "evaluate: CRR against a reference model; "
                             "split: a benchmark into seed and eval parts; "
                             "report: report.html and dataset card of a run; "
                             "plan: calls, tokens and cost of a large run from a "
                             "pilot; "
                             "jobs: list, status or cancel Dataflow jobs; "
                             "prompts: what each stage sends a model; "
                             "show: one pair of a run, traced through the method; "
                             "yaml: a Beam YAML pipeline of codeclm stages, with "
                             "progress; "
                             "tune: a Vertex AI tuning job on a run's kept pairs; "
                             "experiment: split, generate, tune and evaluate, "
                             "resumable; "
                             "push: a run's dataset to the Hugging Face Hub")
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}")
    setup_logging()
    from codeclm_beam.model.errors import ConfigurationError
    from codeclm_beam.pipelines.run.commit import NotCommitted
    from codeclm_beam.pipelines.run.manifest import RunStopped
    try:
        return COMMANDS[command](rest)
    except ConfigurationError as error:
        # Refused before any model call: the message says what to change.
        print(f"codeclm-beam {command}: error: {error}", file=sys.stderr)
        return 2
    except NotCommitted as refused:
        print(f"codeclm-beam {command}: not committed: {refused}", file=sys.stderr)
        return 3
    except RunStopped as stopped:
        print(f"codeclm-beam {command}: stopped: {stopped}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return _interrupted(command)
    except Exception as error:
        if _is_interrupt(error):
            return _interrupted(command)
        reason = _storage_fault(error)
        if reason is None:
            raise
        # The commit protocol makes a run current last: nothing of this one was.
        print(f"codeclm-beam {command}: {reason}; nothing of this run was made current, "
              "and the folder holds what it held before", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
