"""Evaluation by Capacity Recovery Ratio (CRR): benchmark reading and pairwise judging.

For each benchmark instruction, a candidate model (e.g. the tuned target) and the
reference model (the strong model) answer; the judge scores both answers twice at
temperature 0, with the answer order swapped. The candidate *wins* only if it wins in
both orders, *loses* only if it loses in both, and anything else is a *tie*.
CRR = (wins + ties) / (wins + ties + losses); an item whose answer or judgement failed
is a judgement marked `failed`, never left out.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.records import invalid_text_reason
from codeclm_beam.stage import DEAD_LETTER
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import DeadLettering
from codeclm_beam.transforms.read_rows import MakeRecord
from codeclm_beam.transforms.read_rows import ParseRows
from codeclm_beam.transforms.read_seeds import KeepFirstCountRest
from codeclm_beam.transforms.judge import AnswerInstruction
from codeclm_beam.transforms.judge import Contest
from codeclm_beam.transforms.judge import Judge
from codeclm_beam.transforms.judge import JudgeBothOrders
from codeclm_beam.transforms.judge import Verdict
from codeclm_beam.rows import Layout
from codeclm_beam.rows import RowError
from codeclm_beam.rows import detect_layout
from codeclm_beam.rows import jsonl_rows

READ_STAGE = "read_benchmark"
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


def benchmark_names(paths: list[str]) -> dict[str, str]:
    """Each benchmark file's name in results: its file name without extension, or,
    where two files share one (two `test.jsonl` in other folders), as many of its last
    folders as tell them apart. Items are keyed by (benchmark, id): a shared name
    would join one file's answers to the other's."""
    names = {path: benchmark_name(path) for path in paths}
    depth = 1
    while len(set(names.values())) < len(names) and depth < 32:
        depth += 1
        clashing = {n for n in names.values() if list(names.values()).count(n) > 1}
        for path in paths:
            if names[path] in clashing:
                parts = path.replace("\\", "/").rstrip("/").split("/")
                names[path] = "/".join(parts[-depth:-1] + [benchmark_name(path)])
    return names


def make_item(path: str, number: int, row: Any, layout: Layout,
              allow_seed_items: bool = False, name: Optional[str] = None) -> EvalItem:
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
    return EvalItem(name or benchmark_name(path),
                    str(item_id if item_id is not None else number),
                    instruction.strip(), str(category) if category is not None else None)


@dataclasses.dataclass(frozen=True)
class BenchmarkFiles:
    """The benchmark files of a run, with each one's layout, its name in results and
    whether it is the held-out part of a split. `detect` reads each file's first row
    (before the pipeline is built, so a file that cannot be read fails before any
    call); `ReadBenchmarks` then reads the files without opening any itself."""
    layouts: dict[str, Layout]
    names: dict[str, str]
    splits: dict[str, str]  # by benchmark name: HELD_OUT or WHOLE_FILE
    allow_seed_items: bool = False

    @classmethod
    def detect(cls, paths: list[str], instruction_field: Optional[str] = None,
               allow_seed_items: bool = False) -> "BenchmarkFiles":
        layouts, splits = {}, {}
        for path in paths:
            for match in FileSystems.match([path])[0].metadata_list:
                row = first_row(match.path)
                splits[benchmark_name(match.path)] = (
                    HELD_OUT if row.get(SPLIT_MARKER) == "eval" else WHOLE_FILE)
                layouts[match.path] = detect_file_layout(match.path, instruction_field, row)
                if not allow_seed_items and row.get(SPLIT_MARKER) == "seeds":
                    raise ConfigurationError(
                        f"{match.path} is the seed part of a `codeclm-beam split`: "
                        "evaluating on seeds measures memorisation. Evaluate on the "
                        "eval part, or pass --allow_seed_items.")
        if not layouts:
            raise ConfigurationError(f"no benchmark files match {paths}")
        names = benchmark_names(sorted(layouts))
        return cls(layouts, names, {names[path]: splits[benchmark_name(path)]
                                    for path in layouts}, allow_seed_items)

    def items_of(self, path: str) -> MakeRecord:
        """A file's rows to EvalItems (`read_rows.MakeRecord`, one per file). A repeated
        id (question_id 1, 1, 2, ...) would merge two items' answers: the later one
        is told apart by its line."""
        layout, name, seen = self.layouts[path], self.names.get(path), set()

        def make(source: str, row) -> EvalItem:
            number = int(source.rpartition(":")[2])
            item = make_item(path, number, row, layout, self.allow_seed_items, name)
            if item.item_id in seen:
                item = dataclasses.replace(item, item_id=f"{item.item_id}@line{number}")
            seen.add(item.item_id)
            return item
        return make

    @property
    def layout_names(self) -> dict[str, str]:
        return {path: layout.name for path, layout in self.layouts.items()}


class ReadBenchmarks(DeadLettering):
    """Benchmark files (`BenchmarkFiles.detect`) -> PCollection[EvalItem]; rows that
    make no item are dead letters."""

    def __init__(self, files: BenchmarkFiles):
        super().__init__()
        self._files = files

    def expand(self, pbegin):
        parsed = (pbegin
                  | "Files" >> beam.Create(sorted(self._files.layouts))
                  | "Match" >> fileio.MatchAll()
                  | "Open" >> fileio.ReadMatches()
                  | "Parse" >> beam.ParDo(ParseRows(
                      READ_STAGE, self._files.items_of, jsonl_rows)
                  ).with_outputs(DEAD_LETTER, main="main"))
        self.dead_letters(parsed[DEAD_LETTER])
        # A question twice in one benchmark is judged once (and counted), as `split`
        # and `generate` treat a repeated seed: twice would weigh it double in CRR.
        return (parsed.main
                | "KeyByQuestion" >> beam.Map(lambda item: (
                    (item.benchmark, " ".join(item.instruction.split()).casefold()), item))
                | "GroupRepeats" >> beam.GroupByKey()
                | "JudgeOnce" >> beam.ParDo(KeepFirstCountRest(READ_STAGE)))


@dataclasses.dataclass(frozen=True)
class AnsweredItem:
    item: EvalItem
    model: str
    answer: Optional[str] = None

    @property
    def instruction(self) -> str:
        return self.item.instruction

    @property
    def answer_key(self) -> str:
        return f"{self.item.benchmark}/{self.item.item_id}"


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
# The evaluation's judge: greedy, with the visible tokens of two scores and an
# explanation.
EVAL_JUDGE = Judge("eval_judge", GenerationSettings(temperature=0.0, max_output_tokens=768),
                   explain=True)


def contests(answers) -> Iterator[Contest]:
    """A candidate's and the reference's answers to one item, as a contest."""
    _, grouped = answers
    if len(grouped["candidate"]) != 1 or len(grouped["reference"]) != 1:
        # An answer failed: its dead letter holds the reason. (A bare `return` with
        # no comment on its line: Beam's yield-and-return check reads the source.)
        return
    candidate, reference = grouped["candidate"][0], grouped["reference"][0]
    yield Contest(f"{candidate.model}/{candidate.answer_key}", candidate.instruction,
                   candidate.answer, reference.answer, ("candidate", "reference"),
                   payload=candidate.item)


def judgement(verdict: Verdict, candidate: str, reference: str, judge: str) -> Judgement:
    item, contest = verdict.contest.payload, verdict.contest
    return Judgement(
        benchmark=item.benchmark, item_id=item.item_id, category=item.category,
        instruction=item.instruction, candidate_model=candidate, reference_model=reference,
        judge_model=judge, candidate_answer=contest.first, reference_answer=contest.second,
        # (candidate, reference) in each order
        candidate_first_scores=(verdict.first_scores[0], verdict.second_scores[0]),
        reference_first_scores=(verdict.first_scores[1], verdict.second_scores[1]),
        outcome=verdict.outcome, explanations=verdict.explanations)


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


class JudgeAgainstReference(DeadLettering):
    """PCollection[EvalItem] -> PCollection[Judgement], one judgement per item and
    candidate model; the reference answers each item once.

        items ─AnswerReference──────────────────┐
          └─Candidate[c]/Answer ─JoinAnswers────┴─Contest─JudgeBothOrders─Judgement
          └──────────────────────────────────JoinItems─JudgedOrFailed (every item)
    """

    def __init__(self, candidates: list[ModelConfig], reference: ModelConfig,
                 judge: ModelConfig, *,
                 answers: GenerationSettings = AnswerInstruction.settings,
                 judging: Judge = EVAL_JUDGE, run_seed: int = 0):
        super().__init__()
        self._candidates = candidates
        self._reference = reference
        self._judge = judge
        self._answer_reference = AnswerInstruction("eval_answer_reference", answers)
        self._answer_candidate = AnswerInstruction("eval_answer_candidate", answers)
        self._judge_stage = judging
        self._run_seed = run_seed

    def expand(self, items):
        seed = self._run_seed
        ref_uri, judge_uri = self._reference.spec.uri, self._judge.spec.uri
        reference = (items
                     | "ForReference" >> beam.Map(lambda i: AnsweredItem(i, ref_uri))
                     | "AnswerReference" >> self.handled(CallModel(
                         self._answer_reference, self._reference, seed)))
        reference_by_item = reference | "ReferenceByItem" >> beam.Map(_by_item)
        items_by_key = items | "ItemsByKey" >> beam.Map(lambda i: ((i.benchmark, i.item_id), i))
        judged = []
        for index, candidate in enumerate(self._candidates):
            uri, name = candidate.spec.uri, f"Candidate{index}"
            answered = (items
                        | f"{name}/Items" >> beam.Map(lambda i, u=uri: AnsweredItem(i, u))
                        | f"{name}/Answer" >> self.handled(CallModel(
                            self._answer_candidate, candidate, seed)))
            verdicts = ({"candidate": answered | f"{name}/ByItem" >> beam.Map(_by_item),
                         "reference": reference_by_item}
                        | f"{name}/JoinAnswers" >> beam.CoGroupByKey()
                        | f"{name}/Contest" >> beam.FlatMap(contests)
                        | f"{name}/JudgeBothOrders" >> self.handled(JudgeBothOrders(
                            self._judge, self._judge_stage, seed)))
            judged.append(
                {"item": items_by_key,
                 "judgement": verdicts | f"{name}/Judgement" >> beam.Map(
                     lambda v, u=uri: _by_item_key(judgement(v, u, ref_uri, judge_uri)))}
                | f"{name}/JoinItems" >> beam.CoGroupByKey()
                | f"{name}/JudgedOrFailed" >> beam.ParDo(
                    _JudgedOrFailed(uri, ref_uri, judge_uri)))
        return tuple(judged) | "AllJudgements" >> beam.Flatten()


def _by_item(answered: AnsweredItem):
    return (answered.item.benchmark, answered.item.item_id), answered


def _by_item_key(j: Judgement):
    return (j.benchmark, j.item_id), j
