"""`codeclm-beam experiment`: from a benchmark to the tuned target's CRR in one command.

    codeclm-beam experiment --benchmark vicuna.jsonl --output_dir exp \\
        --strong_model vertex:gemini-2.5-flash --target_model vertex:gemini-2.5-flash-lite \\
        --tuning_dir gs://BUCKET/tuning [generate's flags: --num_examples 1000 ...]

    EXP/split/NAME.seeds.jsonl, NAME.eval.jsonl   split: seeds and the held-out part
    EXP/generate/                                 generate on the seeds (a run folder)
    EXP/generate/tuning/job.json                  tune: the job and the tuned model
    EXP/evaluate/                                 evaluate base and tuned target on the
                                                  held-out part, against the strong model
    EXP/experiment.json, experiment.md            every step, and the report

Each step is skipped when its outputs exist, so a run killed at any step resumes where
it stopped and pays for nothing twice: generate and evaluate write their outputs last
and re-read answered calls from their caches, and tune follows the job it created. With
a target that is not a Vertex AI Gemini model the chain stops after generate, leaving
EXP/NEXT_STEPS.md with the files and commands to tune it elsewhere and evaluate it.
"""
from __future__ import annotations

import shlex
import sys
import time
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.uri import ModelSpec
from codeclm_beam.redact import redact
from codeclm_beam.pipelines.commands import tune as tune_lib
from codeclm_beam.pipelines.commands.split import EVAL_SUFFIX
from codeclm_beam.pipelines.commands.split import SEEDS_SUFFIX
from codeclm_beam.pipelines.commands.split import split_file
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.outputs import read_json
from codeclm_beam.pipelines.run.outputs import write_json
from codeclm_beam.pipelines.run.outputs import write_text
from codeclm_beam.transforms.evaluate import benchmark_name

RECORD, REPORT, NEXT_STEPS = "experiment.json", "experiment.md", "NEXT_STEPS.md"
STEPS = ("split", "generate", "tune", "evaluate")


class Experiment:
    def __init__(self, args, pipeline_flags: list[str], pipeline_options):
        """`pipeline_flags` go to generate and evaluate as given; `pipeline_options`
        is what generate's own parser reads in them."""
        self.args = args
        self.flags = pipeline_flags
        self.options = pipeline_options
        self.root = args.output_dir
        self.path = lambda *parts: FileSystems.join(self.root, *parts)
        record_path = self.path(RECORD)
        self.record = read_json(record_path) if FileSystems.exists(record_path) else {
            "benchmark": args.benchmark, "steps": {}}
        if self.record["benchmark"] != args.benchmark:
            raise ConfigurationError(
                f"{self.root} holds the experiment of {self.record['benchmark']}, not "
                f"{args.benchmark}: choose another --output_dir")
        name = benchmark_name(args.benchmark)
        self.seeds = self.path("split", name + SEEDS_SUFFIX)
        self.held_out = self.path("split", name + EVAL_SUFFIX)
        self.run_dir, self.eval_dir = self.path("generate"), self.path("evaluate")
        self.models = {"strong": pipeline_options.strong_model,
                       "target": pipeline_options.target_model}

    # -- the chain ----------------------------------------------------------------------
    def run(self) -> int:
        self._step("split", self._done_split, self._split)
        self._step("generate", lambda: FileSystems.exists(self.path("generate",
                                                                    "manifest.json")),
                   self._generate)
        if tune_lib.tunable_base(self.models["target"]) is None:
            self._next_steps()
            self._write_report()
            print(f"codeclm-beam experiment: {ModelSpec.parse(self.models['target']).uri} "
                  "is not a Vertex AI Gemini model: "
                  f"stopped after generate; what to do next is in {self.path(NEXT_STEPS)}",
                  file=sys.stderr)
            return 0
        self._step("tune", self._done_tune, self._tune)
        if not self._done_tune():  # the job failed or was cancelled: said by tune
            self._write_report()
            return 3
        self._step("evaluate", lambda: FileSystems.exists(self.path("evaluate",
                                                                    "summary.json")),
                   self._evaluate)
        print(self._write_report())
        return 0

    def _step(self, name: str, done, run) -> None:
        entry = self.record["steps"].setdefault(name, {"runs": 0})
        if done():
            entry["status"] = "done earlier" if entry.get("status") else "found done"
            self._save()
            return
        _say(f"{name}: under way")
        started = time.time()
        entry.update(status="under way", runs=entry["runs"] + 1)
        self._save()
        result = run() or {}
        entry.update(status="done", seconds=round(time.time() - started, 1))
        entry.update(result)  # a step that ended without its outputs says how
        self._save()

    def _save(self) -> None:
        write_json(self.path(RECORD), self.record)

    # -- the steps ----------------------------------------------------------------------
    def _done_split(self) -> bool:
        # "rows" is recorded once both parts are written.
        return "rows" in self.record["steps"]["split"] and \
            FileSystems.exists(self.seeds) and FileSystems.exists(self.held_out)

    def _split(self) -> dict:
        result = split_file(self.args.benchmark, self.path("split"),
                            self.args.seed_fraction, self.args.split_seed,
                            self.args.instruction_field)
        return {"rows": result["rows"], "seeds": result["seeds"], "eval": result["eval"]}

    def _generate(self) -> dict:
        from codeclm_beam.pipelines.generate import run
        flags = list(self.flags)
        if "openai" not in self.options.export_format:
            flags += ["--export_format", "openai"]  # what any other trainer takes
        manifest = run(flags + ["--seeds", self.seeds, "--output_dir", self.run_dir])
        if not manifest["accounting"]["balanced"]:
            raise ConfigurationError(f"generate's accounting does not balance; see "
                                     f"{self.run_dir}/manifest.json")
        return {}

    def _tune_settings(self) -> tune_lib.TuneSettings:
        return tune_lib.settings_from(self.args, self.run_dir, self.models["target"],
                                      poll_max_s=self.args.poll_seconds)

    def _tuned(self) -> dict:
        """The tuning record tune wrote beside the run ({} before)."""
        return _read(self.path("generate", "tuning", tune_lib.RECORD)) or {}

    def _done_tune(self) -> bool:
        return bool(self._tuned().get("model_uri"))

    def _tune(self) -> dict:
        record = tune_lib.Tuner(self._tune_settings()).run()
        ended = record["state"].removeprefix("JOB_STATE_").lower()
        return {"job": record["job"],
                **({} if record.get("model_uri") else {"status": f"job {ended}"})}

    def _evaluate(self) -> dict:
        from codeclm_beam.pipelines.evaluate import run
        run(list(self.flags) + ["--benchmark", self.held_out, "--output_dir", self.eval_dir,
                     "--reference_model", self.models["strong"],
                     "--candidate_model", self.models["target"],
                     "--candidate_model", self._tuned()["model_uri"]])
        return {}

    # -- what the user reads ------------------------------------------------------------
    def _next_steps(self) -> None:
        from codeclm_beam.pipelines.run.commit import read_committed
        run = read_committed(self.run_dir)  # its files, wherever the run committed them
        export = run.path("export")
        files = "\n".join(f"   - `{m.path}`" for m in FileSystems.match(
            [FileSystems.join(export, "openai-*.jsonl")])[0].metadata_list)
        flags = " ".join(shlex.quote(f) for f in _model_only(self.flags))
        text = f"""# Next steps: tune {self.models['target']} elsewhere

`codeclm-beam experiment` tunes Vertex AI Gemini models itself; this target is served
elsewhere, so the chain stopped after `generate`.

1. Train on the kept pairs, in the OpenAI chat format most trainers take:
{files}
   (Gemini's format: `--export_format vertex`; Alpaca: `--export_format alpaca`, in
   `{export}`). Preference pairs (chosen = the kept answer, rejected =
   the other model's) are in `{run.path("examples")}/examples-*.jsonl`
   (`response`, `other_response`, `gap`).
2. Serve the tuned weights behind an OpenAI-compatible server (vLLM, llama.cpp
   server, Ollama) as, say, `openai:tuned@http://HOST:8000/v1`.
3. Evaluate base and tuned on the held-out part:

       codeclm-beam evaluate --benchmark {self.held_out} \\
           --reference_model {self.models['strong']} \\
           --candidate_model {self.models['target']} \\
           --candidate_model openai:tuned@http://HOST:8000/v1 \\
           --output_dir {self.eval_dir} {flags}

   If the tuned model is served at the base model's name and address, tell the two
   apart with a tag: `...#rev=tuned`.
"""
        # The flags are the user's own: an address in them may carry a key.
        write_text(self.path(NEXT_STEPS), redact(text), "text/markdown")

    def _write_report(self) -> str:
        lines = [f"# codeclm-beam experiment: {self.args.benchmark}", ""]
        steps = self.record["steps"]
        split = steps.get("split", {})
        if "rows" in split:
            lines.append(f"{split['rows']} rows: {split['seeds']} seeds, {split['eval']} "
                         "held out for evaluation")
        costs, rows = {}, []
        manifest = _read(self.path("generate", "manifest.json"))
        if manifest:
            cost = manifest.get("cost") or {}
            costs["data"] = _sum(cost.get("usd"), cost.get("usd_paid_before"))
            calls = manifest["model_calls"]["totals"]
            rows.append(("generate", f"{manifest['accounting']['candidates']['examples_written']}"
                         f" pairs; {calls.get('requests', 0)} requests, "
                         f"{calls.get('cache_hits', 0)} cache hits"))
        job = _read(self.path("generate", "tuning", tune_lib.RECORD))
        if job:
            costs["tuning"] = (job.get("cost") or {}).get("usd")
            rows.append(("tune", f"{job.get('state')}; {job.get('examples', {}).get('training', '?')}"
                         f" training examples; {job.get('model_uri') or job.get('error') or ''}"))
        summary = _read(self.path("evaluate", "summary.json"))
        crr_lines = []
        if summary:
            cost = summary.get("cost") or {}
            costs["evaluation"] = _sum(cost.get("usd"), cost.get("usd_paid_before"))
            calls = summary["model_calls"]["totals"]
            rows.append(("evaluate", f"{calls.get('requests', 0)} requests, "
                         f"{calls.get('cache_hits', 0)} cache hits"))
            names = {summary["models"]["candidates"][0]: "base",
                     summary["models"]["candidates"][-1]: "tuned"}
            crr_lines.append(f"CRR against {summary['models']['reference']} (judge "
                             f"{summary['models']['judge']}; {summary['judge_independence']}):")
            for row in summary["candidates"]:
                overall = row["overall"]
                crr_lines.append(
                    f"  {names.get(row['candidate_model'], '?'):5} "
                    f"{row['candidate_model']}: {overall['crr']}% (win {overall['win']}, "
                    f"tie {overall['tie']}, loss {overall['loss']}, failed "
                    f"{overall['failed']})")
            for diff in summary["differences"]:
                crr_lines.append(
                    f"  ΔCRR {diff['difference']:+.2f} points, 95% CI "
                    f"[{diff['ci95_low']:+.2f}, {diff['ci95_high']:+.2f}] (paired "
                    f"bootstrap over {diff['items']} items of {diff['benchmark']})")
        lines += ["", "| step | status | runs | what came of it |", "| --- | --- | --- | --- |"]
        done = dict(rows)
        for step in STEPS:
            entry = steps.get(step)
            if entry:
                lines.append(f"| {step} | {entry.get('status')} | {entry.get('runs', 0)} | "
                             f"{done.get(step, '')} |")
        lines += [""] + crr_lines
        known = [v for v in costs.values() if v is not None]
        lines += ["", "cost: " + ", ".join(
            f"{name} {_usd(value)}" for name, value in costs.items())
            + (f"; total {_usd(sum(known))}" if known else "")
            + " (estimates at list prices; data and evaluation include what earlier, "
              "killed runs paid for the answers they cached)"]
        text = "\n".join(lines) + "\n"
        write_text(self.path(REPORT), text, "text/markdown")
        return text


def _usd(value: Optional[float]) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _sum(*values) -> Optional[float]:
    return None if values[0] is None else round(sum(v or 0 for v in values), 4)


def _read(path: str) -> Optional[dict]:
    return read_json(path) if FileSystems.exists(path) else None


def _say(line: str) -> None:
    print(f"codeclm-beam experiment: {line}", file=sys.stderr, flush=True)


def _model_only(flags: list[str]) -> list[str]:
    """The flags of how models are called (for the evaluate command to copy)."""
    from codeclm_beam.options import ModelOptions
    from codeclm_beam.pipelines.run.args import option_actions
    actions = {option: action for action in option_actions(ModelOptions)
               for option in action.option_strings
               if option not in ("--strong_model", "--target_model")}
    kept, i = [], 0
    while i < len(flags):
        flag, inline = flags[i].split("=", 1)[0], "=" in flags[i]
        action = actions.get(flag)
        # A flag's value is the next word unless written --flag=VALUE or it takes none.
        takes_value = not inline and action is not None and action.nargs != 0
        if action is not None:
            kept += flags[i:i + 1 + takes_value]
        i += 1 + takes_value
    return kept


def experiment_command(argv: list[str]) -> int:
    from codeclm_beam.pipelines.cli import refuse_unknown_options
    from codeclm_beam.pipelines.generate import OPTION_VIEWS
    from codeclm_beam.pipelines.cli import _options_parser
    from codeclm_beam.pipelines.evaluate import EvaluateOptions
    parser = SuggestingParser(prog="codeclm-beam experiment",
                              description=__doc__.split("\n\n")[0],
                              epilog="Every other flag is generate's (models, sizes, "
                                     "--vertex_mode, ...) and Beam's; the model flags "
                                     "apply to evaluate as well.")
    parser.add_argument("--benchmark", required=True,
                        help="Benchmark JSONL: split into seeds and a held-out part.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed_fraction", type=float, default=0.2)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--instruction_field", default=None)
    tune_lib.add_tuning_flags(parser)
    parser.add_argument("--poll_seconds", type=float, default=60.0,
                        help="Longest wait between two looks at the tuning job.")
    args, rest = parser.parse_known_args(argv)
    refuse_unknown_options(_options_parser("codeclm-beam experiment", "", *OPTION_VIEWS),
                           rest)
    # What generate (and evaluate) will read in the other flags.
    known, _ = _options_parser("", "", *OPTION_VIEWS, EvaluateOptions).parse_known_args(rest)
    for flag in ("seeds", "candidate_model", "reference_model"):
        if getattr(known, flag):
            parser.error(f"--{flag} is the experiment's to set (from --benchmark and the "
                         "models)")
    # The model flags tune needs, read where generate reads them.
    args.vertex_project, args.vertex_location = known.vertex_project, known.vertex_location
    args.model_base_url = known.model_base_url
    return Experiment(args, rest, known).run()

