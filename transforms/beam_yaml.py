"""The CodecLM stages as Beam YAML transforms.

`providers.yaml` beside this module is the provider (`include:` it, or copy its block
into a pipeline's `providers:`); each entry names a factory below. Their config keys
are the factories' keyword arguments; models are model URIs, as on the command line.

Elements between YAML transforms are schema'd rows (`beam.Row`), so the stages work
with YAML's own transforms (ReadFromJson, WriteToJson, Filter, MapToFields...): a stage
reads rows with its record's fields and writes rows of its output record's fields.
Every stage that calls a model takes `error_handling: {output: NAME}`, as Beam YAML's
own transforms do, and Beam then refuses a pipeline that leaves NAME unconsumed: dead
letters are never dropped silently.

    pipeline:
      transforms:
        - type: ReadSeeds
          config: {path: seeds.jsonl, error_handling: {output: bad_rows}}
        - type: CodecLM
          input: ReadSeeds
          config: {strong_model: "llamacpp:smollm2-135m", num_examples: 4,
                   error_handling: {output: dead_letters}}
        - type: WriteToJson
          input: CodecLM.examples
          config: {path: out/examples.jsonl}
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import typing
from typing import Any, Optional

import apache_beam as beam
from apache_beam.transforms.error_handling import CollectingErrorHandler
from apache_beam.typehints.row_type import RowTypeConstraint

from codeclm_beam import records
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.uri import DEFAULT_MODEL_URI
from codeclm_beam.stage import Stage
from codeclm_beam.transforms.codeclm import config_default
from codeclm_beam.transforms.decontaminate import DecontaminationRule
from codeclm_beam.transforms.dedup import DedupRule
from codeclm_beam.transforms.improve import Improve
from codeclm_beam.transforms.judge import AnswerInstruction
from codeclm_beam.transforms.judge import Judge

PROVIDERS = os.path.join(os.path.dirname(__file__), "providers.yaml")


def _row_type(record_class: type) -> RowTypeConstraint:
    hints = typing.get_type_hints(record_class)

    def beam_type(hint):
        if typing.get_origin(hint) is tuple:
            return typing.Sequence[typing.get_args(hint)[0]]
        if typing.get_origin(hint) is typing.Union:
            inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
            return typing.Optional[beam_type(inner)]
        return hint

    return RowTypeConstraint.from_fields(
        [(f.name, beam_type(hints[f.name])) for f in dataclasses.fields(record_class)])


def _to_row(record) -> beam.Row:
    return beam.Row(**{name: list(value) if isinstance(value, tuple) else value
                       for name, value in dataclasses.asdict(record).items()})


def _from_row(record_class: type):
    """A row (or the record itself) as `record_class`."""
    hints = typing.get_type_hints(record_class)

    def convert(element):
        if isinstance(element, record_class):
            return element
        values = element._asdict() if hasattr(element, "_asdict") else dict(element)
        fields = {}
        for field in dataclasses.fields(record_class):
            if field.name not in values:
                continue
            value = values[field.name]
            if typing.get_origin(hints[field.name]) is tuple and value is not None:
                value = tuple(value)
            fields[field.name] = value
        return record_class(**fields)
    return convert


class _AsRows(beam.PTransform):
    def __init__(self, record_class: type):
        super().__init__()
        self._record_class = record_class

    def expand(self, pcoll):
        return pcoll | beam.Map(_to_row).with_output_types(_row_type(self._record_class))


class _AsRecords(beam.PTransform):
    def __init__(self, record_class: type):
        super().__init__()
        self._record_class = record_class

    def expand(self, pcoll):
        return pcoll | beam.Map(_from_row(self._record_class)).with_output_types(
            self._record_class)


def _error_output(error_handling: Optional[dict], stage: str) -> str:
    if not error_handling or not error_handling.get("output"):
        raise ValueError(f"{stage}: set error_handling: {{output: NAME}} and write NAME "
                         "(its dead letters are never dropped silently)")
    return error_handling["output"]


# Where YAML stages keep answers unless model_options says otherwise (cache_dir: null
# turns the cache off): a killed run resumes from it, as the CLI's runs do from
# OUTPUT_DIR/cache. On Dataflow give a gs:// cache_dir that every worker sees.
DEFAULT_CACHE_DIR = "codeclm_cache"


def _model(uri: Optional[str], model_options: Optional[dict]) -> ModelConfig:
    return ModelConfig(uri=uri or DEFAULT_MODEL_URI,
                       **{"cache_dir": DEFAULT_CACHE_DIR, **(model_options or {})})


class _Stage(beam.PTransform):
    """A codeclm stage between rows: input rows as `input_record`, each output of the
    stage (the PCollection it returns when the field is None, else a field of the
    NamedTuple it returns) as rows of its record class, and its dead letters, collected
    by an ErrorHandler, as the YAML error output."""

    def __init__(self, stage: beam.PTransform, input_record: Optional[type],
                 outputs: dict[str, tuple[str, type]], error_output: str):
        super().__init__()
        self._stage = stage
        self._input_record = input_record
        self._outputs = outputs  # YAML output name -> (stage output field, record)
        self._error_output = error_output

    def expand(self, pcoll):
        if self._input_record is not None:
            pcoll = pcoll | "AsRecords" >> _AsRecords(self._input_record)
        with CollectingErrorHandler() as dead_letters:
            result = pcoll | "Stage" >> self._stage.with_error_handler(dead_letters)
        outputs = {name: (result if field is None else getattr(result, field))
                   | f"{name}AsRows" >> _AsRows(record)
                   for name, (field, record) in self._outputs.items()}
        outputs[self._error_output] = (dead_letters.output()
                                       | "DeadLettersAsRows" >> _AsRows(records.DeadLetter))
        return outputs


def ReadSeeds(path: str, error_handling: dict, instruction_field: Optional[str] = None,
              max_chars: int = 20_000):
    """Seed instructions from files (JSONL, JSON, CSV/TSV, Parquet, Avro).

    Args:
      path: A file pattern, local or gs://.
      error_handling: {output: NAME}: the rows that are not seeds, with the reason.
      instruction_field: The instruction's field (a dotted path), when not detected.
      max_chars: Longer instructions are refused.
    """
    from codeclm_beam.transforms.read_seeds import ReadSeeds as Read
    return _Stage(Read(path, instruction_field, max_chars), None,
                  {"good": (None, records.Seed)},
                  _error_output(error_handling, "ReadSeeds"))


ReadSeeds._yaml_requires_inputs = False


def _model_stage(stage_class: type):
    """The YAML factory of a one-model stage, derived from the stage itself
    (`Stage.yaml` and its fields): its config keys are the stage's own fields, its
    settings' `temperature` and `max_output_tokens` (defaulting to the stage's),
    `model`, `model_options`, `seed` and `error_handling`, after the composite's own
    leading arguments. A stage's field added or changed shows here with nothing else
    to edit."""
    face = stage_class.yaml
    name, leading = face.name, face.leading
    hints = typing.get_type_hints(stage_class)
    own = [f for f in dataclasses.fields(stage_class) if f.name not in ("name", "settings")]
    defaults = stage_class.settings
    module, _, class_name = face.transform.rpartition(".")
    transform_class = getattr(importlib.import_module(module), class_name)
    transform_hints = typing.get_type_hints(transform_class.__init__)

    def factory(error_handling: dict, model: Optional[str] = None,
                model_options: Optional[dict] = None, seed: int = 0, **config):
        settings = GenerationSettings(
            config.pop("temperature", defaults.temperature),
            config.pop("max_output_tokens", defaults.max_output_tokens))
        arguments = [config.pop(key) for key in leading]
        fields = {f.name: config.pop(f.name) for f in own if f.name in config}
        if config:
            raise TypeError(f"{name}: unknown config keys {sorted(config)}")
        return _Stage(
            transform_class(_model(model, model_options), *arguments,
                            stage_class(settings=settings, **fields), seed),
            face.input_record, {"good": (None, face.output_record)},
            _error_output(error_handling, name))

    keyword = inspect.Parameter.KEYWORD_ONLY
    factory.__signature__ = inspect.Signature(
        [inspect.Parameter(key, keyword, annotation=transform_hints[key]) for key in leading]
        + [inspect.Parameter("error_handling", keyword, annotation=dict),
           inspect.Parameter("model", keyword, default=None, annotation=Optional[str]),
           inspect.Parameter("model_options", keyword, default=None,
                             annotation=Optional[dict])]
        + [inspect.Parameter(f.name, keyword, default=f.default, annotation=hints[f.name])
           for f in own]
        + [inspect.Parameter("temperature", keyword, default=defaults.temperature,
                             annotation=float),
           inspect.Parameter("max_output_tokens", keyword,
                             default=defaults.max_output_tokens, annotation=int),
           inspect.Parameter("seed", keyword, default=0, annotation=int)])
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = face.doc + """

    Args:
      error_handling: {output: NAME}: the elements that failed, with the reason.
      model: The model's URI (default: the embedded SmolLM2).
      model_options: Other ModelConfig fields (max_concurrency, cache_dir, ...).
    """
    return factory


def _model_stage_factories() -> dict:
    """A factory for every registered stage that has a YAML face."""
    importlib.import_module("codeclm_beam.transforms").import_stage_modules()
    return {stage.yaml.name: _model_stage(stage) for stage in Stage.registered()
            if stage.yaml is not None}


# EncodeMetadata, GenerateRubrics, DecodeInstructions, ...: module attributes, as
# providers.yaml names them.
MODEL_STAGES = _model_stage_factories()
globals().update(MODEL_STAGES)


class BuildMetadataPool(beam.PTransform):
    """Metadata rows -> the metadata pool (every original, plus mix-and-match)."""

    def __init__(self, num_metadata: int = 200, max_skills: int = 3, seed: int = 0):
        super().__init__()
        self._args = (num_metadata, max_skills, seed)

    def expand(self, metadata):
        from codeclm_beam.transforms.metadata_pool import BuildMetadataPool as Build
        return (metadata
                | "AsRecords" >> _AsRecords(records.Metadata)
                | "Pool" >> Build(*self._args)
                | "AsRows" >> _AsRows(records.Metadata))


def ContrastiveFilter(error_handling: dict, strong_model: Optional[str] = None,
                      target_model: Optional[str] = None, judge_model: Optional[str] = None,
                      model_options: Optional[dict] = None,
                      threshold: float = config_default("threshold"),
                      score_scale: int = Judge.score_scale,
                      answer_temperature: float = AnswerInstruction.settings.temperature,
                      judge_temperature: float = Judge.settings.temperature,
                      max_output_tokens: int = AnswerInstruction.settings.max_output_tokens,
                      seed: int = 0):
    """Candidates -> kept pairs (output `kept`) and candidates within the threshold
    (output `undecided`, for ImproveInstructions). The judge defaults to the strong
    model."""
    from codeclm_beam.transforms.contrastive_filter import ContrastiveFilter as Filter
    strong = _model(strong_model, model_options)
    return _Stage(
        Filter(strong, _model(target_model, model_options),
               _model(judge_model, model_options) if judge_model else strong,
               threshold=threshold,
               answers=GenerationSettings(answer_temperature, max_output_tokens),
               judging=Judge(settings=dataclasses.replace(
                   Judge.settings, temperature=judge_temperature), score_scale=score_scale),
               run_seed=seed),
        records.Candidate,
        {"kept": ("kept", records.Example), "undecided": ("undecided", records.Candidate)},
        _error_output(error_handling, "ContrastiveFilter"))


class ImproveInstructions(beam.PTransform):
    """{candidates: undecided candidate rows, rubrics: GenerateRubrics rows} ->
    rewritten candidates, one iteration on (the input names are fixed)."""

    def __init__(self, error_handling: dict, model: Optional[str] = None,
                 model_options: Optional[dict] = None,
                 temperature: float = Improve.settings.temperature,
                 max_output_tokens: int = Improve.settings.max_output_tokens, seed: int = 0):
        super().__init__()
        self._error_output = _error_output(error_handling, "ImproveInstructions")
        self._model = _model(model, model_options)
        self._stage = Improve(settings=GenerationSettings(temperature, max_output_tokens))
        self._seed = seed

    def expand(self, inputs: dict[str, Any]):
        from codeclm_beam.transforms.improve import ImproveInstructions
        if set(inputs) != {"candidates", "rubrics"}:
            raise ValueError("ImproveInstructions takes input: {candidates: ..., "
                             f"rubrics: ...}}, not {sorted(inputs)}")
        rubrics = inputs["rubrics"] | "RubricsAsRecords" >> _AsRecords(records.RubricSet)
        return inputs["candidates"] | "Improve" >> _Stage(
            ImproveInstructions(self._model, rubrics, self._stage, self._seed),
            records.Candidate,
            {"good": (None, records.Candidate)}, self._error_output)


def CodecLM(error_handling: dict, strong_model: Optional[str] = None,
            target_model: Optional[str] = None, judge_model: Optional[str] = None,
            model_options: Optional[dict] = None, from_metadata: bool = False,
            **method: Any):
    """The whole method: seed rows (or metadata rows with from_metadata) -> outputs
    `examples`, `rejected`, `metadata_pool`, `rubrics` and `seed_metadata`.

    Args:
      method: CodecLMConfig's fields: num_examples, num_metadata, max_iterations,
        threshold, keep_unresolved, ...; codec, answers and judging as
        {temperature: T, max_output_tokens: N}; dedup as {threshold: J,
        ngram_size: N} (null: off); decontamination as {benchmarks: [FILE, ...]}.
    """
    from codeclm_beam.transforms.codeclm import CodecLM as Method
    from codeclm_beam.transforms.codeclm import CodecLMConfig
    strong = _model(strong_model, model_options)
    rules = {"codec": GenerationSettings, "answers": GenerationSettings,
             "judging": GenerationSettings, "dedup": DedupRule,
             "decontamination": DecontaminationRule}
    method = {key: rules[key](**value) if key in rules and isinstance(value, dict)
              else value for key, value in method.items()}
    config = CodecLMConfig(strong=strong, target=_model(target_model, model_options),
                           judge=_model(judge_model, model_options) if judge_model
                           else strong, **method)
    return _Stage(Method(config, from_metadata),
                  records.Metadata if from_metadata else records.Seed,
                  {"examples": ("examples", records.Example),
                   "rejected": ("rejected", records.Rejection),
                   "metadata_pool": ("metadata_pool", records.Metadata),
                   "rubrics": ("rubrics", records.RubricSet),
                   "seed_metadata": ("seed_metadata", records.Metadata)},
                  _error_output(error_handling, "CodecLM"))


class _Screened(beam.PTransform):
    """A screen between rows: `kept`, the input rows as they came (their schema
    too), and the removed rows' `Removal` records under `removed_output`; a screen
    that reads files gives its bad rows to the YAML error output."""

    def __init__(self, screen: beam.PTransform, removed_output: str,
                 error_output: Optional[str] = None):
        super().__init__()
        self._screen = screen
        self._removed_output = removed_output
        self._error_output = error_output

    def expand(self, rows):
        outputs = {}
        if self._error_output:
            with CollectingErrorHandler() as dead_letters:
                result = rows | "Screen" >> self._screen.with_error_handler(dead_letters)
            outputs[self._error_output] = (dead_letters.output()
                                           | "DeadLettersAsRows" >> _AsRows(records.DeadLetter))
        else:
            result = rows | "Screen" >> self._screen
        outputs["kept"] = result.kept | "Kept" >> beam.Map(lambda row: row).with_output_types(
            rows.element_type)
        outputs[self._removed_output] = (result.removed
                                         | "Removals" >> beam.Map(lambda r: r.removal)
                                         | "RemovalsAsRows" >> _AsRows(records.Removal))
        return outputs


def DeduplicateInstructions(text_field: str = "instruction", id_field: Optional[str] = None,
                            threshold: float = DedupRule.threshold,
                            ngram_size: int = DedupRule.ngram_size,
                            num_perm: int = DedupRule.num_perm):
    """Rows -> `kept` (the rows, schema unchanged) and `duplicates` (element_id,
    duplicate_of, similarity, matched_text): exact and MinHash near duplicates of
    `text_field` (a pair at or above the threshold is found at least 99.5% of the time).

    Args:
      text_field: The field compared.
      id_field: The field naming a row (default: a hash of its text).
      threshold: Jaccard similarity of word n-grams at which rows are near duplicates.
      ngram_size: Words per n-gram.
      num_perm: MinHash permutations.
    """
    from codeclm_beam.transforms.dedup import DeduplicateInstructions as Deduplicate
    return _Screened(Deduplicate(text=text_field, key=id_field,
                                 rule=DedupRule(threshold, ngram_size, num_perm)),
                     "duplicates")


def Decontaminate(benchmarks: list, error_handling: dict, text_fields: Optional[list] = None,
                  id_field: Optional[str] = None,
                  ngram_size: int = DecontaminationRule.ngram_size,
                  instruction_field: Optional[str] = None, join: str = "auto",
                  share: float = DecontaminationRule.share):
    """Rows -> `kept` (the rows, schema unchanged) and `contaminated` (element_id,
    benchmark_row, rule, overlap, field, similarity, matched_text): rows whose texts
    copy or lightly edit a row of the benchmark files (a shared word n-gram, more than
    `share` of the row's word 3-grams, or word-set Jaccard >= 0.8; short rows whole).

    Args:
      benchmarks: Evaluation files or patterns (any layout the seed reader knows).
      error_handling: {output: NAME}: benchmark rows that hold no instruction.
      text_fields: The fields checked (default: [instruction]).
      id_field: The field naming a row (default: a hash of its texts).
      ngram_size: Words per n-gram (8: open-r1's and s1's rule).
      instruction_field: The benchmark rows' instruction field, when not detected.
      join: auto, side_input or keyed (how the benchmark reaches the workers).
      share: More than this share of a row's word 3-grams contaminates.
    """
    from codeclm_beam.transforms.decontaminate import Decontaminate as Screen
    return _Screened(Screen(DecontaminationRule(tuple(benchmarks), ngram_size,
                                                instruction_field, join, share),
                            tuple(text_fields or ("instruction",)), key=id_field),
                     "contaminated", _error_output(error_handling, "Decontaminate"))


def WriteJsonLines(path: str):
    """Rows -> one JSON object a line, in PATH-SSSSS-of-NNNNN files (the library's
    `codeclm_beam.sinks.WriteLines`). Unlike YAML's WriteToJson (a pandas write), an
    empty input still writes one empty file: a run that kept nothing says so with a
    file, not with a missing one.

    Args:
      path: The files' prefix (local or gs://).
    """
    from codeclm_beam.sinks import WriteLines
    return WriteLines(path)


# Transforms written here by hand, in the order the method runs them; the one-model
# stages' factories (MODEL_STAGES) are derived from the stages.
_COMPOSITES = ("ReadSeeds", "BuildMetadataPool", "ContrastiveFilter",
               "ImproveInstructions", "CodecLM", "DeduplicateInstructions", "Decontaminate",
               "WriteJsonLines")


def providers_yaml() -> str:
    """The provider file (providers.yaml beside this module) of every transform here:
    `python -m codeclm_beam.transforms.beam_yaml > transforms/providers.yaml`; a test
    fails when the shipped file lags behind the stages."""
    names = [_COMPOSITES[0], *sorted(MODEL_STAGES), *_COMPOSITES[1:]]
    return ("# The CodecLM stages for Beam YAML (transforms/beam_yaml.py). In a pipeline:\n"
            "#   providers:\n#     - include: <this file>\n"
            "# or copy the block below into the pipeline's `providers:`.\n"
            "# Written by `python -m codeclm_beam.transforms.beam_yaml`.\n"
            "- type: python\n  config: {}\n  transforms:\n"
            + "".join(f"    {name}: codeclm_beam.transforms.beam_yaml.{name}\n"
                      for name in names))


if __name__ == "__main__":
    print(providers_yaml(), end="")
