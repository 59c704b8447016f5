"""`codeclm-beam generate`: seeds (or metadata) in, tailored instruction data out."""
from __future__ import annotations

import dataclasses
import logging
import shlex
import functools
import time
import uuid
from typing import Any, Optional

import apache_beam as beam
from apache_beam.transforms.error_handling import ErrorHandler
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions

from codeclm_beam import metrics
from codeclm_beam.metrics import RunCounters
from codeclm_beam.pipelines.run.manifest import billing_modes
from codeclm_beam.transforms.method import projected_elements
from codeclm_beam.transforms.method import simulate_rounds
from codeclm_beam.pipelines.run.progress import progress_for
from codeclm_beam.pipelines.run.answer_options import AnswerOptions
from codeclm_beam.pipelines.run.args import is_dry_run
from codeclm_beam.options import ModelOptions
from codeclm_beam.pipelines.run.args import RunOptions
from codeclm_beam.options import model_configs
from codeclm_beam.pipelines.run.args import option_actions
from codeclm_beam.records import Example
from codeclm_beam.redact import redact
from codeclm_beam.records import Rejection
from codeclm_beam.stage import Tally
from codeclm_beam.transforms import CodecLM
from codeclm_beam.transforms import CodecLMConfig
from codeclm_beam.transforms.codeclm import config_default
from codeclm_beam.transforms.decontaminate import DecontaminationRule
from codeclm_beam.transforms.dedup import DedupRule
from codeclm_beam.pipelines.commands.split import held_out_of
from codeclm_beam.transforms import ReadMetadata
from codeclm_beam.transforms import ReadSeeds
from codeclm_beam.transforms.read_seeds import DEFAULT_MAX_CHARS
from codeclm_beam.transforms.selection import TakeLowestRanked
from codeclm_beam.transforms.selection import stable_rank
from codeclm_beam.pipelines.run import manifest as manifest_lib
from codeclm_beam.sinks import EXPORT_FORMATS
from codeclm_beam.hf_dataset import WriteHubDataset
from codeclm_beam.hf_dataset import write_card
from codeclm_beam.pipelines.commands.push import push_run
from codeclm_beam.sinks import WriteAvro
from codeclm_beam.sinks import WriteDeadLetters
from codeclm_beam.sinks import WriteExports
from codeclm_beam.sinks import WriteJsonl
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.commit import run_in_folder
from codeclm_beam.pipelines.run.outputs import read_jsonl_dir
from codeclm_beam.pipelines.report.figures import run_tailoring
from codeclm_beam.pipelines.report.render import write_report
from codeclm_beam.pipelines.run import preflight as preflight_lib
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.transforms.read_seeds import make_seed
from codeclm_beam.transforms.read_seeds import make_user_metadata
from codeclm_beam.options import COUNT
from codeclm_beam.options import RETRIES
from codeclm_beam.options import SHARE
from codeclm_beam.options import TEMPERATURE
from codeclm_beam.options import bounded

_LOG = logging.getLogger(__name__)
OUTPUT_FOLDERS = ("examples", "rejected", "dead_letter", "seed_metadata", "metadata_pool",
                  "rubrics", "export", "data")


class GenerateOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("generate")
        group.add_argument("--seeds", default=None,
                           help="Seed instructions: a file or glob (JSONL, JSON, CSV, "
                                "Parquet, Avro; local or gs://).")
        group.add_argument("--metadata", default=None,
                           help="Instead of seeds: use case + skills rows (scenario 2).")
        group.add_argument("--instruction_field", default=None,
                           help="Dotted path of the instruction in a seed row.")
        group.add_argument("--max_seed_chars", type=COUNT, default=DEFAULT_MAX_CHARS,
                           help="Longer seed instructions go to the dead letter.")
        group.add_argument("--num_examples", type=COUNT,
                           default=config_default("num_examples"),
                           help="Instruction-response pairs wanted.")
        group.add_argument("--num_instructions", type=COUNT, default=None,
                           help="Basic instructions to decode (default: 2 x "
                                "num_examples). Round 1 judges num_examples of them; "
                                "the rest is a reserve later rounds draw from when "
                                "fewer pairs are kept than needed.")
        group.add_argument("--overgenerate_margin", type=RETRIES,
                           default=config_default("overgenerate_margin"),
                           help="Candidates improved beyond those still needed.")
        group.add_argument("--num_metadata", type=COUNT, default=None,
                           help="Metadata pool size (mix-and-match fills it). Default: "
                                "one entry per 10 basic instructions, at most the "
                                "paper's 200 (more only when a decode call would "
                                "have to write over 64).")
        group.add_argument("--preview", type=COUNT, default=None, metavar="N",
                           help="Run N pairs through every stage from N of the seeds, "
                                "with the pool sized to them, print them, and leave "
                                "the output folder as it was (answers are cached for "
                                "the real run).")
        group.add_argument("--max_seeds", type=seed_count, default=None, metavar="N|all",
                           help="Encode a seeded sample of at most N seeds: each seed "
                                "costs an encode call, and its metadata a rubrics and a "
                                "decode call in the pool. Default: the pool size, at "
                                f"least {MIN_SEEDS_SAMPLED}; `all` encodes every seed.")
        group.add_argument("--max_skills", type=COUNT, default=config_default("max_skills"))
        group.add_argument("--num_rubrics", type=COUNT,
                           default=config_default("num_rubrics"))
        group.add_argument("--max_iterations", type=COUNT,
                           default=config_default("max_iterations"),
                           help="Filter rounds, basic generation counted as the first.")
        group.add_argument("--threshold", type=bounded(float, 0), default=config_default("threshold"),
                           help="Score gap θ for contrastive filtering.")
        group.add_argument("--score_scale", type=bounded(int, 2),
                           default=config_default("score_scale"))
        group.add_argument("--keep_unresolved", action="store_true", default=False,
                           help="Keep the better answer of candidates still within θ "
                                "after the last round (default: reject them).")
        group.add_argument("--temperature", type=TEMPERATURE,
                           default=config_default("codec").temperature,
                           help="Temperature of encode, rubrics, decode and improve.")
        group.add_argument("--codec_max_output_tokens", type=COUNT,
                           default=config_default("codec").max_output_tokens,
                           help="Longest structured answer of encode, rubrics, decode "
                                "and improve.")
        group.add_argument("--no_dedup", action="store_true", default=False,
                           help="Judge duplicate instructions too (default: exact and "
                                "near duplicates are removed before any answer or "
                                "judgement is paid for, within each round and against "
                                "every candidate judged in earlier rounds).")
        group.add_argument("--dedup_threshold", type=bounded(float, 0, 1, above=True),
                           default=DedupRule.threshold,
                           help="Jaccard similarity of word n-grams at or above which "
                                "two instructions are near duplicates (each such pair is "
                                "found at least 99.5%% of the time).")
        group.add_argument("--dedup_ngram_size", type=COUNT, default=DedupRule.ngram_size,
                           help="Words per n-gram compared by deduplication.")
        group.add_argument("--decontaminate", action="append", default=[], metavar="FILE",
                           help="An evaluation file (any layout the seed reader knows; "
                                "repeatable): seeds, instructions before they are "
                                "judged, and final pairs (answers too) that copy or "
                                "lightly edit one of its rows are removed: a shared "
                                "word n-gram, more than half of a row's word 3-grams "
                                "(--decontaminate_share), or word-set Jaccard >= 0.8; "
                                "rows under 5 words compared whole. Seeds from "
                                "`codeclm-beam split` add its held-out half by "
                                "themselves.")
        group.add_argument("--decontaminate_ngram_size", type=COUNT,
                           default=DecontaminationRule.ngram_size,
                           help="Words per n-gram of which one shared with a row "
                                "is contamination (8: open-r1's and s1's rule; 13: "
                                "GPT-3's).")
        group.add_argument("--decontaminate_share", type=SHARE,
                           default=DecontaminationRule.share,
                           help="An instruction or answer holding more than this share "
                                "of a benchmark row's word 3-grams is contaminated "
                                "(default: more than half).")
        group.add_argument("--decontaminate_field", default=None,
                           help="Dotted path of the instruction in the evaluation "
                                "files' rows, when not detected.")
        group.add_argument("--keep_contaminated_seeds", action="store_true", default=False,
                           help="Encode seeds that match a --decontaminate file too "
                                "(default: they are reported in contaminated_seeds/ and "
                                "the manifest, and left out of encoding).")
        group.add_argument("--no_decontaminate_answers", action="store_true", default=False,
                           help="Check only the final pairs' instructions, not their "
                                "answers.")
        group.add_argument("--validation_share", type=SHARE,
                           default=0.0,
                           help="Share of the pairs in the dataset's validation split "
                                "(data/, README.md): the pairs `tune` would hold out "
                                "with the same share. Default: a train split only.")
        group.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                           help="After the run commits, push its dataset to this "
                                "Hugging Face dataset repository (private; as "
                                "`codeclm-beam push`).")
        group.add_argument("--export_format", action="append", default=[],
                           choices=EXPORT_FORMATS,
                           help="Also write fine-tuning files (repeatable).")


# Every flag `generate` takes, in the order the CLI and the Flex Template list them.
OPTION_VIEWS = (GenerateOptions, AnswerOptions, RunOptions, ModelOptions)


# The share of judged candidates the progress display's projection takes as kept
# before any round has been judged.
PRIOR_KEPT_SHARE = 0.5
# Below this many seeds every seed is encoded whatever the pool's size.
MIN_SEEDS_SAMPLED = 100


def seed_count(value: str) -> int:
    """--max_seeds: a count of at least 1, or `all` (0: no sample)."""
    return 0 if value == "all" else COUNT(value)


def seeds_encoded_at_most(opts: "GenerateOptions", config: CodecLMConfig) -> Optional[int]:
    """How many seeds a run encodes at most (None: all): a pool of num_metadata entries
    needs that many seeds' metadata, and every distinct one stays in the pool, with a
    rubrics and a decode call each."""
    if opts.max_seeds is None:
        return max(config.num_metadata, MIN_SEEDS_SAMPLED)
    return opts.max_seeds or None


def codeclm_config(options: PipelineOptions, run_id: str) -> CodecLMConfig:
    opts = options.view_as(GenerateOptions)
    answers = options.view_as(AnswerOptions)
    output_dir = options.view_as(RunOptions).output_dir
    models = model_configs(options, FileSystems.join(output_dir, "cache"), run_id)
    if opts.preview is not None:
        if opts.preview < 1:
            raise ConfigurationError(f"--preview must be at least 1, not {opts.preview}")
        # A preview is a run of N pairs, sized as a run of N pairs would be, with two
        # rounds at most: the second is the first with an improve step before it, so
        # every stage has run.
        config = _codeclm_config(opts, answers, models, options)
        return dataclasses.replace(config, num_examples=opts.preview,
                                   num_instructions=None, num_metadata=None,
                                   max_iterations=min(config.max_iterations, 2))
    return _codeclm_config(opts, answers, models, options)


def _codeclm_config(opts, answers, models, options) -> CodecLMConfig:
    return CodecLMConfig(
        strong=models["strong"], target=models["target"], judge=models["judge"],
        num_examples=opts.num_examples, num_instructions=opts.num_instructions,
        overgenerate_margin=opts.overgenerate_margin, num_metadata=opts.num_metadata,
        max_skills=opts.max_skills, num_rubrics=opts.num_rubrics,
        max_iterations=opts.max_iterations, threshold=opts.threshold,
        score_scale=opts.score_scale, keep_unresolved=opts.keep_unresolved,
        codec=GenerationSettings(opts.temperature, opts.codec_max_output_tokens),
        answers=GenerationSettings(answers.answer_temperature, answers.max_output_tokens),
        judging=dataclasses.replace(config_default("judging"),
                                    temperature=answers.judge_temperature),
        seed=options.view_as(ModelOptions).seed,
        dedup=None if opts.no_dedup else DedupRule(opts.dedup_threshold,
                                                   opts.dedup_ngram_size),
        decontamination=_decontamination(opts),
        decontaminate_answers=not opts.no_decontaminate_answers,
        keep_contaminated_seeds=opts.keep_contaminated_seeds)


def _decontamination(opts: "GenerateOptions") -> Optional[DecontaminationRule]:
    """The --decontaminate files, and the held-out half of a split the seeds are the
    other half of."""
    benchmarks = list(opts.decontaminate)
    held_out = held_out_of(opts.seeds) if opts.seeds else None
    if held_out and held_out not in benchmarks:
        _LOG.info("seeds from `codeclm-beam split`: decontaminating against its held-out "
                  "half %s", held_out)
        benchmarks.append(held_out)
    if not benchmarks:
        return None
    return DecontaminationRule(tuple(benchmarks), opts.decontaminate_ngram_size,
                               opts.decontaminate_field, share=opts.decontaminate_share)


def screens(config: CodecLMConfig, seeds: Optional[str]) -> dict[str, Any]:
    """The screens' rules, as the manifest and the dataset card state them."""
    rule = config.decontamination
    return {"dedup": config.dedup.describe() if config.dedup else None,
            "decontamination": None if rule is None else {
                "rule": rule.describe(), "benchmarks": list(rule.benchmarks),
                "answers_checked": config.decontaminate_answers,
                "held_out_of_split": held_out_of(seeds) if seeds else None}}


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                   config: CodecLMConfig, out: str) -> None:
    """The generate pipeline, writing its outputs under `out`."""
    opts = options.view_as(GenerateOptions)
    if bool(opts.seeds) == bool(opts.metadata):
        raise ConfigurationError("give exactly one of --seeds and --metadata")
    with ErrorHandler(WriteDeadLetters(out)) as dead_letters:
        _build(pipeline, opts, config, out, dead_letters)


def _build(pipeline, opts: "GenerateOptions", config: CodecLMConfig, out: str,
           dead_letters: ErrorHandler) -> None:
    if opts.seeds:
        inputs = (pipeline
                  | "ReadSeeds" >> ReadSeeds(
                      opts.seeds, opts.instruction_field, opts.max_seed_chars
                  ).with_error_handler(dead_letters)
                  | "CountSeeds" >> Tally(metrics.SEEDS))
    else:
        inputs = (pipeline
                  | "ReadMetadata" >> ReadMetadata(
                      opts.metadata, opts.max_skills).with_error_handler(dead_letters)
                  | "CountUserMetadata" >> Tally(metrics.USER_METADATA))
    if opts.preview is not None:
        sample = inputs | "PreviewSample" >> TakeLowestRanked(preview_rank, opts.preview)
        sample.rest | "CountNotPreviewed" >> Tally(metrics.NOT_PREVIEWED)
        inputs = sample.taken
    most = seeds_encoded_at_most(opts, config) if opts.seeds else None
    if most is not None:
        sample = inputs | "SampleSeeds" >> TakeLowestRanked(preview_rank, most)
        sample.rest | "CountNotSampled" >> Tally(metrics.NOT_SAMPLED)
        inputs = sample.taken
    result = inputs | "CodecLM" >> CodecLM(
        config, from_metadata=bool(opts.metadata)).with_error_handler(dead_letters)

    result.examples | "WriteExamples" >> WriteJsonl(out, "examples")
    result.examples | "WriteExamplesAvro" >> WriteAvro(out, "examples", Example)
    result.rejected | "WriteRejected" >> WriteJsonl(out, "rejected")
    result.rejected | "WriteRejectedAvro" >> WriteAvro(out, "rejected", Rejection)
    if result.seeds_contaminated is not None:
        result.seeds_contaminated | "WriteContaminatedSeeds" >> WriteJsonl(
            out, "contaminated_seeds")
    # The method's side products are written once the examples are (shape:
    # docs/performance.md, "Composite shapes for the local runner").
    examples_written = beam.pvalue.AsSingleton(
        result.examples | "CountWritten" >> beam.CombineGlobally(
            beam.combiners.CountCombineFn()).without_defaults(), default_value=0)
    for name, folder, records in (("SeedMetadata", "seed_metadata", result.seed_metadata),
                                  ("MetadataPool", "metadata_pool", result.metadata_pool),
                                  ("Rubrics", "rubrics", result.rubrics)):
        (records
         # Behind a shuffle: the wait is not fused upstream of what it waits for.
         | f"Hold{name}" >> beam.Reshuffle()
         | f"{name}AfterExamples" >> beam.Map(lambda record, _: record, examples_written)
         | f"Write{name}" >> WriteJsonl(out, folder))
    if opts.export_format:
        result.examples | "Export" >> WriteExports(out, opts.export_format)
    result.examples | "WriteDataset" >> WriteHubDataset(out, opts.validation_share)


def preview_rank(element) -> int:
    """The order a preview takes seeds (or metadata rows) in: reproducible, and spread
    over the file rather than its first rows."""
    return stable_rank(repr(element))


def public_options(options: PipelineOptions) -> dict[str, Any]:
    """The options worth recording. Nothing secret is an option: keys and tokens are
    read from the environment by backends and never pass through here."""
    all_options = options.get_all_options(drop_default=False)
    names = {action.dest for action in option_actions(*OPTION_VIEWS)}
    recorded = {name: _public(all_options.get(name)) for name in sorted(names)}
    recorded["runner"] = options.view_as(StandardOptions).runner or "DirectRunner"
    return recorded


def _public(value: Any) -> Any:
    """An option's value as it may be recorded: credentials out of any URL in it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def rerun_command(options: PipelineOptions) -> str:
    """This run's command line, as far as our own flags go (Beam's are the user's)."""
    names = {action.dest: action for action in option_actions(*OPTION_VIEWS)}
    words = ["codeclm-beam generate"]
    for name, value in sorted(options.get_all_options(drop_default=True).items()):
        action = names.get(name)
        if action is None or name == "num_instructions" or value in (None, [], False):
            continue
        values = _public(value if isinstance(value, list) else [value])
        words += [f"--{name}"] if value is True else [
            f"--{name} {shlex.quote(str(v))}" for v in values]
    return " ".join(words)


def preflight(options: PipelineOptions, config: CodecLMConfig) -> None:
    """Everything that can be checked before a file is written or a call is made. A
    dry run builds the job offline: it reads no gs:// input."""
    opts = options.view_as(GenerateOptions)
    run_opts = options.view_as(RunOptions)
    offline = is_dry_run(options)
    if bool(opts.seeds) == bool(opts.metadata):
        raise ConfigurationError("give exactly one of --seeds and --metadata")
    preflight_lib.check_gcs_paths(
        [("--seeds", opts.seeds), ("--metadata", opts.metadata),
         ("--output_dir", run_opts.output_dir), ("--cache_dir", config.strong.cache_dir),
         ("--batch_dir", config.strong.batch.batch_dir)], options, offline)
    preflight_lib.check_output_budget("--max_output_tokens",
                                      config.answers.max_output_tokens,
                                      [config.strong, config.target])
    preflight_lib.check_output_budget("--codec_max_output_tokens",
                                      config.codec.max_output_tokens, [config.strong])
    preflight_lib.check_decode_size(config.basic_instructions, config.num_metadata,
                                    config.num_examples)
    if config.decontamination is not None and not offline:
        config.decontamination.files  # every --decontaminate file is there
    if offline and (opts.seeds or opts.metadata).startswith("gs://"):
        return
    if opts.seeds:
        preflight_lib.check_rows(opts.seeds, "--seeds", lambda source, row: make_seed(
            source, row, opts.instruction_field, opts.max_seed_chars))
    else:
        preflight_lib.check_rows(opts.metadata, "--metadata",
                                 lambda source, row: make_user_metadata(
                                     source, row, config.max_skills))
    if not offline:  # last: everything local is checked before a model is asked
        preflight_lib.check_models_reachable(
            [("strong", config.strong), ("target", config.target),
             ("judge", config.judge)])


def projected_calls(config: CodecLMConfig, from_metadata: bool,
                    counters: RunCounters, max_seeds: Optional[int] = None) -> Optional[int]:
    """The calls (model or cache) this run will make, for the progress display's ETA:
    the rounds as `plan` projects them (`simulate_rounds`, the rule `generate`
    follows), at the share each round has kept of what it judged so far; a round not
    reached yet takes the last measured share (none measured: PRIOR_KEPT_SHARE)."""
    cfg = config
    seeds = 0 if from_metadata else counters.flow(metrics.SEEDS)
    if not from_metadata and not seeds:
        return None  # no estimate until the seeds are read: the pool depends on them
    seeds = min(seeds, max_seeds or seeds)
    # Mix-and-match fills the pool to --num_metadata, and every distinct metadata of
    # the seeds stays in it: until it is built, at most one entry a seed beyond that.
    pool = counters.flow(metrics.METADATA_POOL) or max(cfg.num_metadata, seeds, 1)
    basic = counters.flow(metrics.BASIC_INSTRUCTIONS) or cfg.basic_instructions
    # Until a round has judged something, half of what is judged is taken as kept:
    # "nothing kept" would project every round at full size and then fall by half.
    accept, share = [], PRIOR_KEPT_SHARE
    for number in range(1, cfg.max_iterations + 1):
        kept = counters.in_round(number, "kept")
        decided = kept + counters.in_round(number, "undecided")
        share = kept / decided if decided else share
        accept.append(share)
    rounds = simulate_rounds(tuple(accept), basic, cfg.num_examples,
                             cfg.overgenerate_margin, cfg.keep_unresolved)
    return round(sum(projected_elements(rounds, seeds, pool).values()))


def _preview(manifest: dict, config: CodecLMConfig, outputs: OutputFolder) -> dict:
    """A --preview run's record and pairs. Its outputs are read and dropped, so the
    folder holds what it held (and its cache the preview's answers)."""
    manifest["billing"] = billing_modes(config.strong, config.target, config.judge)
    manifest["cost"] = manifest_lib.estimated_cost(manifest)
    manifest["preview"] = {
        "pairs": sorted(read_jsonl_dir(FileSystems.join(outputs.run_dir, "examples")),
                        key=lambda pair: pair.get("example_id", "")),
        "rejected": sorted(read_jsonl_dir(FileSystems.join(outputs.run_dir, "rejected")),
                           key=lambda candidate: candidate.get("candidate_id", "")),
        "dead_letters": read_jsonl_dir(FileSystems.join(outputs.run_dir, "dead_letter"))}
    outputs.abandon()
    return manifest


def run(argv: Optional[list[str]] = None, options: Optional[PipelineOptions] = None,
        wait: bool = True, lean: bool = False) -> dict[str, Any]:
    """Runs `generate` and returns its manifest (also committed to OUTPUT_DIR). `lean`
    (the CLI's own local runs) swaps Beam internals for the run's length:
    `pipelines/run/lean.py`; a library caller's process is left alone."""
    options = options or PipelineOptions(argv)
    run_id = uuid.uuid4().hex[:12]
    config = codeclm_config(options, run_id)
    run_opts = options.view_as(RunOptions)
    # The folder is checked, and claimed, before anything asks a model.
    outputs = OutputFolder(run_opts.output_dir, run_id, "manifest.json", run_opts.force,
                           cache_dir=config.strong.cache_dir)
    return run_in_folder(
        outputs, not is_dry_run(options),
        lambda: _run_claimed(options, config, outputs, run_id, wait, lean),
        first=lambda: preflight(options, config))


def _run_claimed(options: PipelineOptions, config: CodecLMConfig,
                 outputs: OutputFolder, run_id: str, wait: bool,
                 lean: bool) -> dict[str, Any]:
    opts = options.view_as(GenerateOptions)
    run_opts = options.view_as(RunOptions)
    started = time.time()
    _, result, not_finished = manifest_lib.build_and_run(
        options, outputs, "codeclm-beam generate", run_id, wait, lean,
        build=lambda pipeline: build_pipeline(pipeline, options, config, outputs.run_dir),
        progress=lambda _: progress_for(options, config.num_examples, functools.partial(
            projected_calls, config, bool(opts.metadata),
            max_seeds=seeds_encoded_at_most(opts, config))))
    if not_finished:
        return not_finished
    counters = RunCounters.from_result(result)
    manifest = {
        **manifest_lib.run_header("codeclm-beam generate", run_id, started),
        "models": config.models,
        "options": public_options(options),
        "accounting": manifest_lib.accounting(
            counters, config.max_iterations, bool(opts.metadata), config.keep_unresolved,
            config.num_metadata, config.keep_contaminated_seeds),
        "model_calls": counters.model_calls(),
        "screens": screens(config, opts.seeds),
    }
    if opts.preview is not None:
        return _preview(manifest, config, outputs)
    delivered = counters.flow(metrics.EXAMPLES)
    outputs.keep_previous_if_fewer(
        manifest, f"delivered {delivered} of {config.num_examples} pairs", delivered,
        lambda previous: previous.get("delivery", {}).get("delivered"), "pairs",
        run_opts.replace_with_fewer)
    manifest.update({
        "billing": billing_modes(config.strong, config.target, config.judge),
        "outputs": {name: FileSystems.join(outputs.run_dir, name)
                    for name in OUTPUT_FOLDERS + (
                        ("contaminated_seeds",) if config.decontamination and opts.seeds
                        else ())},
        "tailoring": run_tailoring(outputs.run_dir),
    })
    manifest["cost"] = manifest_lib.estimated_cost(manifest)
    manifest["delivery"] = manifest_lib.delivery(
        manifest["accounting"], config.num_examples, config.basic_instructions,
        rerun_command(options))
    manifest["dataset"] = write_card(outputs, manifest)
    if not run_opts.no_report:
        manifest["report"] = write_report(outputs, manifest)
    outputs.commit(manifest)
    if opts.push_to_hub:
        try:
            push_run(run_opts.output_dir, opts.push_to_hub)
        except ConfigurationError as refused:
            raise ConfigurationError(
                f"the run is committed in {run_opts.output_dir}, but not pushed: "
                f"{refused}; push it with: codeclm-beam push {run_opts.output_dir} "
                f"{opts.push_to_hub}") from None
    return manifest
