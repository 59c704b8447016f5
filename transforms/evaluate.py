"""Evaluation by Capacity Recovery Ratio (CRR): benchmark reading and pairwise judging.

For each benchmark instruction, a candidate model (e.g. the tuned target) and the
reference model (the strong model) answer; the judge scores both answers twice at
temperature 0, with the answer order swapped. The candidate *wins* only if it wins in
both orders, *loses* only if it loses in both, and anything else is a *tie*.
CRR = (wins + ties) / total.

    items ─AnswerReference────────────────────────┐
          └AnswerCandidate[c] ─ join by item ──────┴─ PairForJudge ─ Judge (2 orders) ─ Outcome
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from codeclm_beam import metrics
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model.thinking import DEFAULT
from codeclm_beam.records import DeadLetter
from codeclm_beam.records import invalid_text_reason
from codeclm_beam.stage import DEAD_LETTER
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageOutput
from codeclm_beam.stage import StageSpec
from codeclm_beam.transforms.contrastive_filter import answer_prompt
from codeclm_beam.transforms.contrastive_filter import judge_schema
from codeclm_beam.transforms.contrastive_filter import pairwise_judge_prompt
from codeclm_beam.rows import Layout
from codeclm_beam.rows import RowError
from codeclm_beam.rows import detect_layout
from codeclm_beam.rows import jsonl_rows

# Rows that `codeclm-beam split` put in the seed part carry this marker.
SPLIT_MARKER = "codeclm_split"
HELD_OUT = "held-out part of a codeclm-beam split (not comparable with the paper's tables)"
WHOLE_FILE = "whole file as given (the paper's tables cover whole benchmarks)"


@dataclasses.dataclass(frozen=True)
class EvalItem:
    benchmark: str
    item_id: str
    instruction: str
    category: Optional[str] = None


def benchmark_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def first_row(path: str) -> dict:
    """The first row of a benchmark file; fails with the file's name when it has none
    or cannot be read."""
    matches = FileSystems.match([path])[0].metadata_list
    if not matches:
        raise ConfigurationError(f"benchmark file {path} does not exist")
    with FileSystems.open(matches[0].path) as handle:
        for _, row in jsonl_rows(path, handle):
            if isinstance(row, RowError):
                raise ConfigurationError(f"benchmark file {path}: {row}")
            if not isinstance(row, dict):
                raise ConfigurationError(f"benchmark file {path}: rows are not JSON objects")
            return row
    raise ConfigurationError(f"benchmark file {path} is empty")


def detect_file_layout(path: str, instruction_field: Optional[str] = None,
                       row: Optional[dict] = None,
                       flag: str = "--evaluate_instruction_field") -> Layout:
    """Names the layout of a benchmark file from its first row (`row`, when the caller
    has read it already); fails with the file and the fields it found when it cannot."""
    row = first_row(path) if row is None else row
    layout = detect_layout(row, instruction_field)
    if layout is None:
        raise ConfigurationError(
            f"benchmark file {path}: cannot tell its layout (Evol-Instruct, "
            "Vicuna, Self-Instruct, Koala) from the fields found: "
            f"{sorted(row)}; name the instruction's field with {flag}")
    return layout


def make_item(path: str, number: int, row: Any, layout: Layout,
              allow_seed_items: bool = False) -> EvalItem:
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    if row.get(SPLIT_MARKER) == "seeds" and not allow_seed_items:
        raise RowError("this item was used as a seed (codeclm-beam split); evaluating "
                       "on it would measure memorisation")
    instruction = layout.instruction(row)
    if not isinstance(instruction, str) or not instruction.strip():
        raise RowError("no instruction text in the row")
    invalid = invalid_text_reason(instruction)
    if invalid:
        raise RowError(f"instruction is {invalid}")
    item_id = row.get(layout.id_field) if layout.id_field else None
    category = row.get(layout.category_field) if layout.category_field else None
    return EvalItem(benchmark_name(path), str(item_id if item_id is not None else number),
                    instruction.strip(), str(category) if category is not None else None)


class _ParseBenchmark(beam.DoFn):
    def __init__(self, layouts: dict[str, Layout], allow_seed_items: bool):
        self._layouts = layouts
        self._allow_seed_items = allow_seed_items

    def process(self, readable):
        path = readable.metadata.path
        layout = self._layouts[path]
        with readable.open() as handle:
            for source, row in jsonl_rows(path, handle):
                number = int(source.rpartition(":")[2])
                try:
                    if isinstance(row, RowError):
                        raise row
                    yield make_item(path, number, row, layout, self._allow_seed_items)
                except RowError as e:
                    yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                        "read_benchmark", source, e, payload=row if isinstance(
                            row, dict) else None, reason="bad_input"))


class ReadBenchmarks(beam.PTransform):
    """Benchmark files -> StageOutput-like (items, dead letters). Layouts are detected
    when the pipeline is built, so a file that cannot be read fails before any call."""

    def __init__(self, paths: list[str], instruction_field: Optional[str] = None,
                 allow_seed_items: bool = False):
        super().__init__()
        self._layouts = {}
        self._splits = {}
        for path in paths:
            for match in FileSystems.match([path])[0].metadata_list:
                row = first_row(match.path)
                self._splits[benchmark_name(match.path)] = (
                    HELD_OUT if row.get(SPLIT_MARKER) == "eval" else WHOLE_FILE)
                self._layouts[match.path] = detect_file_layout(match.path,
                                                               instruction_field, row)
                if not allow_seed_items and row.get(SPLIT_MARKER) == "seeds":
                    raise ConfigurationError(
                        f"{match.path} is the seed part of a `codeclm-beam split`: "
                        "evaluating on seeds measures memorisation. Evaluate on the "
                        "eval part, or pass --allow_seed_items.")
        if not self._layouts:
            raise ConfigurationError(f"no benchmark files match {paths}")
        self._allow = allow_seed_items

    @property
    def layouts(self) -> dict[str, str]:
        return {path: layout.name for path, layout in self._layouts.items()}

    def layout_of(self, path: str) -> Layout:
        return self._layouts[path]

    @property
    def splits(self) -> dict[str, str]:
        """Per benchmark: whether its file is the held-out part of a split or a whole
        benchmark (the paper's tables are whole benchmarks)."""
        return dict(self._splits)

    def expand(self, pbegin):
        parsed = (pbegin
                  | "Files" >> beam.Create(sorted(self._layouts))
                  | "Match" >> fileio.MatchAll()
                  | "Open" >> fileio.ReadMatches()
                  | "Parse" >> beam.ParDo(_ParseBenchmark(
                      self._layouts, self._allow)).with_outputs(
                          DEAD_LETTER, main="main"))
        return StageOutput(parsed.main, parsed[DEAD_LETTER])


@dataclasses.dataclass(frozen=True)
class AnsweredItem:
    item: EvalItem
    model: str
    answer: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class EvalJudgeTask:
    item: EvalItem
    candidate_model: str
    candidate_answer: str
    reference_answer: str
    candidate_first: bool


@dataclasses.dataclass(frozen=True)
class Judgement:
    benchmark: str
    item_id: str
    category: Optional[str]
    instruction: str
    candidate_model: str
    reference_model: str
    judge_model: str
    candidate_answer: Optional[str]
    reference_answer: Optional[str]
    # [candidate score, reference score] in each order
    candidate_first_scores: tuple[float, ...]
    reference_first_scores: tuple[float, ...]
    # "win" | "tie" | "loss" for the candidate, or "failed": an answer or a judgement
    # could not be had (its dead letter says why); never left out silently.
    outcome: str
    # The judge's explanation in each order (candidate first, reference first).
    explanations: tuple[str, ...] = ()


FAILED = "failed"
# Visible tokens of an evaluation judgement: two scores and an explanation.
EVAL_JUDGE_VISIBLE_TOKENS = 768


def outcome_of(candidate_first: tuple[float, float],
               reference_first: tuple[float, float]) -> str:
    """Win only if the candidate wins in both orders, loss only if it loses in both."""
    wins = [c > r for c, r in (candidate_first, reference_first)]
    losses = [c < r for c, r in (candidate_first, reference_first)]
    if all(wins):
        return "win"
    if all(losses):
        return "loss"
    return "tie"


def _answer_spec(stage: str, settings: GenerationSettings) -> StageSpec:
    return StageSpec(
        name=stage, prompt=lambda a: answer_prompt(a.item),
        parse=lambda a, text: [dataclasses.replace(a, answer=text.strip())],
        record_id=lambda a: f"{a.item.benchmark}/{a.item.item_id}", settings=settings,
        thinking=DEFAULT)


class _Outcome(beam.DoFn):
    def __init__(self, reference: str, judge: str):
        self._reference = reference
        self._judge = judge

    def process(self, keyed):
        _, scored = keyed
        orders = {task.candidate_first: scores for task, scores in scored}
        if len(orders) != 2:
            metrics.flow_counter(metrics.incomplete("eval_judge")).inc()
            return
        task = next(t for t, _ in scored)
        explanations = {t.candidate_first: scores[2] for t, scores in scored}
        cf = tuple(orders[True][:2])  # candidate is Assistant 1
        rf = tuple(orders[False][:2])  # reference is Assistant 1
        candidate_first = (cf[0], cf[1])
        reference_first = (rf[1], rf[0])
        yield Judgement(
            benchmark=task.item.benchmark, item_id=task.item.item_id,
            category=task.item.category, instruction=task.item.instruction,
            candidate_model=task.candidate_model, reference_model=self._reference,
            judge_model=self._judge, candidate_answer=task.candidate_answer,
            reference_answer=task.reference_answer,
            candidate_first_scores=candidate_first, reference_first_scores=reference_first,
            outcome=outcome_of(candidate_first, reference_first),
            explanations=(explanations[True], explanations[False]))


class _JudgedOrFailed(beam.DoFn):
    """Every item leaves with a judgement: its own, or one marked failed."""

    def __init__(self, candidate: str, reference: str, judge: str):
        self._models = (candidate, reference, judge)

    def process(self, joined):
        _, grouped = joined
        judgements = grouped["judgement"]
        if judgements:
            yield judgements[0]
            return
        candidate, reference, judge = self._models
        for item in grouped["item"][:1]:
            yield Judgement(
                benchmark=item.benchmark, item_id=item.item_id, category=item.category,
                instruction=item.instruction, candidate_model=candidate,
                reference_model=reference, judge_model=judge, candidate_answer=None,
                reference_answer=None, candidate_first_scores=(),
                reference_first_scores=(), outcome=FAILED)


class JudgeAgainstReference(beam.PTransform):
    """PCollection[EvalItem] -> (PCollection[Judgement], dead letters), one judgement
    per item and candidate model."""

    def __init__(self, candidates: list[ModelConfig], reference: ModelConfig,
                 judge: ModelConfig, score_scale: int = 10,
                 answer_temperature: float = 0.7, max_output_tokens: int = 1024,
                 run_seed: int = 0, judge_temperature: float = 0.0):
        super().__init__()
        self._candidates = candidates
        self._reference = reference
        self._judge = judge
        self._scale = score_scale
        self._answer_settings = GenerationSettings(answer_temperature, max_output_tokens)
        self._run_seed = run_seed
        self._judge_spec = StageSpec(
            name="eval_judge",
            prompt=lambda t: pairwise_judge_prompt(
                t.item.instruction,
                t.candidate_answer if t.candidate_first else t.reference_answer,
                t.reference_answer if t.candidate_first else t.candidate_answer,
                score_scale, explain=True),
            parse=lambda t, data: [(t, (float(data["assistant_1_score"]),
                                        float(data["assistant_2_score"]),
                                        data["explanation"].strip()))],
            record_id=lambda t: (f"{t.candidate_model}/{t.item.benchmark}/{t.item.item_id}/"
                                 f"{'candidate' if t.candidate_first else 'reference'}"
                                 "-first"),
            schema=judge_schema(score_scale, explain=True),
            settings=GenerationSettings(judge_temperature, EVAL_JUDGE_VISIBLE_TOKENS))

    def expand(self, items):
        seed = self._run_seed
        ref_uri = self._reference.spec.uri
        reference = (items
                     | "ForReference" >> beam.Map(lambda i: AnsweredItem(i, ref_uri))
                     | "AnswerReference" >> CallModel(
                         _answer_spec("eval_answer_reference", self._answer_settings),
                         self._reference, seed))
        reference_by_item = reference.output | "ReferenceByItem" >> beam.Map(
            lambda a: ((a.item.benchmark, a.item.item_id), a))
        items_by_key = items | "ItemsByKey" >> beam.Map(
            lambda i: ((i.benchmark, i.item_id), i))
        dead = [reference.dead_letter]
        judged = []
        for index, candidate in enumerate(self._candidates):
            uri = candidate.spec.uri
            name = f"Candidate{index}"
            answered = (items
                        | f"{name}/Items" >> beam.Map(lambda i, u=uri: AnsweredItem(i, u))
                        | f"{name}/Answer" >> CallModel(
                            _answer_spec("eval_answer_candidate", self._answer_settings),
                            candidate, seed))
            dead.append(answered.dead_letter)
            tasks = ({"candidate": answered.output | f"{name}/ByItem" >> beam.Map(
                          lambda a: ((a.item.benchmark, a.item.item_id), a)),
                      "reference": reference_by_item}
                     | f"{name}/JoinAnswers" >> beam.CoGroupByKey()
                     | f"{name}/PairForJudge" >> beam.FlatMap(_judge_tasks))
            scored = tasks | f"{name}/Judge" >> CallModel(self._judge_spec, self._judge, seed)
            dead.append(scored.dead_letter)
            outcomes = (
                scored.output
                | f"{name}/ByPair" >> beam.Map(
                    lambda ts: ((ts[0].item.benchmark, ts[0].item.item_id), ts))
                | f"{name}/GroupOrders" >> beam.GroupByKey()
                | f"{name}/Outcome" >> beam.ParDo(_Outcome(ref_uri, self._judge.spec.uri))
                | f"{name}/OutcomeByItem" >> beam.Map(
                    lambda j: ((j.benchmark, j.item_id), j)))
            judged.append(
                {"item": items_by_key, "judgement": outcomes}
                | f"{name}/JoinItems" >> beam.CoGroupByKey()
                | f"{name}/JudgedOrFailed" >> beam.ParDo(
                    _JudgedOrFailed(uri, ref_uri, self._judge.spec.uri)))
        return StageOutput(
            tuple(judged) | "AllJudgements" >> beam.Flatten(),
            tuple(dead) | "AllDeadLetters" >> beam.Flatten())


def _judge_tasks(joined):
    _, grouped = joined
    if len(grouped["candidate"]) != 1 or len(grouped["reference"]) != 1:
        return  # an answer failed: its dead letter holds the reason
    candidate, reference = grouped["candidate"][0], grouped["reference"][0]
    for candidate_first in (True, False):
        yield EvalJudgeTask(candidate.item, candidate.model, candidate.answer,
                            reference.answer, candidate_first)

