"""Answering an instruction, and judging two answers in both orders.

Shared by contrastive filtering (strong vs target) and evaluation (candidate vs
reference). The judge scores two answers to one instruction on a 1..score_scale scale
twice, once with each answer as "Assistant 1", to cancel its position bias (Vicuna's
pairwise prompt, as the paper uses it):

    contests ─BothOrders─ Judge ─ByContest─ GroupOrders ─Verdict─> verdicts
                            └──────────────────────────────────> dead letters

A verdict holds each contestant's score in both orders, their means and gap (the
filter's rule), and the outcome for the first contestant (evaluation's rule: a win
only if it wins in both orders, a loss only if it loses in both).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, Literal, NamedTuple

import apache_beam as beam
from pydantic import StringConstraints

from codeclm_beam import metrics
from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model.thinking import DEFAULT
from codeclm_beam.records import SAMPLE_ANSWERED
from codeclm_beam.records import SAMPLE_CANDIDATE
from codeclm_beam.transforms.prompt_templates import PromptTemplate
from codeclm_beam.stage import Answer
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import Stage
from codeclm_beam.stage import DeadLettering


@dataclasses.dataclass(frozen=True)
class AnswerInstruction(Stage):
    """A record with an `instruction` and an `answer_key` -> the record with the
    model's answer in its field `into`. Free text, at the model's own thinking."""

    name: str = "answer"
    settings: GenerationSettings = GenerationSettings()
    into: str = "answer"

    thinking = DEFAULT

    @classmethod
    def samples(cls):
        return {"answer": (cls(), SAMPLE_CANDIDATE)}

    def record_id(self, record) -> str:
        return record.answer_key

    def prompt(self, record) -> list[ChatMessage]:
        return PromptTemplate.load("answer").messages(instruction=record.instruction)

    def parse(self, record, text: str) -> list[Any]:
        return [dataclasses.replace(record, **{self.into: text.strip()})]


@dataclasses.dataclass(frozen=True)
class Contest:
    """Two answers to one instruction, to be judged in both orders."""

    # Names the contest; the judge's record ids (and so its sampling seeds) are
    # "{key}/{label}-first".
    key: str
    instruction: str
    first: str
    second: str
    # What the contestants are, for record ids: ("strong", "target"), ...
    labels: tuple[str, str]
    # The caller's record, handed back with the verdict.
    payload: Any = None


@dataclasses.dataclass(frozen=True)
class JudgeTask:
    contest: Contest
    first_first: bool  # the first contestant's answer is "Assistant 1"


class OrderScores(NamedTuple):
    """One order's scores, named by its contest's key rather than carrying the
    contest: they go to the contest's verdict, which the contest joins once."""
    contest_key: str
    first_first: bool
    assistant_1: float
    assistant_2: float
    explanation: str = ""


@dataclasses.dataclass(frozen=True)
class Verdict:
    contest: Contest
    # Each contestant's score in the first-first order, then in the second-first one.
    first_scores: tuple[float, float]
    second_scores: tuple[float, float]
    # The judge's explanations in the same two orders ("" when none was asked for).
    explanations: tuple[str, str] = ("", "")

    @property
    def first_mean(self) -> float:
        return sum(self.first_scores) / 2

    @property
    def second_mean(self) -> float:
        return sum(self.second_scores) / 2

    @property
    def gap(self) -> float:
        return self.first_mean - self.second_mean

    @property
    def outcome(self) -> str:
        """For the first contestant: "win" only if it wins in both orders, "loss" only
        if it loses in both, else "tie"."""
        pairs = list(zip(self.first_scores, self.second_scores))
        if all(a > b for a, b in pairs):
            return "win"
        if all(a < b for a, b in pairs):
            return "loss"
        return "tie"


class JudgeAnswer(Answer):
    """Two scores; in evaluation, an explanation after them (property order is the
    answer's order under constrained decoding)."""

    assistant_1_score: int
    assistant_2_score: int


class ExplainedJudgeAnswer(JudgeAnswer):
    explanation: str


@functools.cache
def judge_answer(score_scale: int, explain: bool = False) -> type[Answer]:
    # Scores as an enum, not min/max bounds: grammar-constrained backends (llama.cpp)
    # enforce enums, and every backend's structured output supports them.
    score = Literal[tuple(range(1, score_scale + 1))]
    if explain:
        return ExplainedJudgeAnswer.variant(
            assistant_1_score=score, assistant_2_score=score,
            explanation=Annotated[str, StringConstraints(min_length=1)])
    return JudgeAnswer.variant(assistant_1_score=score, assistant_2_score=score)


def pairwise_judge_prompt(question: str, first: str, second: str, score_scale: int,
                          explain: bool = False) -> list[ChatMessage]:
    """Vicuna's pairwise judge prompt, as the paper uses it: the two scores only in
    filtering (`judge_filter`, Figure 11); the scores first, then an explanation, in
    evaluation (`judge_eval`, Figure 12)."""
    return PromptTemplate.load("judge_eval" if explain else "judge_filter").messages(
        question=question, answer_1=first, answer_2=second, score_scale=score_scale)


@dataclasses.dataclass(frozen=True)
class Judge(Stage):
    """JudgeTask -> the scores of one order."""

    name: str = "judge"
    # Greedy, and the visible tokens of a judgement of two scores as JSON (about 20);
    # the limit sent adds the judge's thinking allowance (`codeclm_beam.model.thinking`).
    settings: GenerationSettings = GenerationSettings(temperature=0.0, max_output_tokens=64)
    score_scale: int = 10
    explain: bool = False

    @classmethod
    def samples(cls):
        filtering = Contest(SAMPLE_ANSWERED.answer_key, SAMPLE_ANSWERED.instruction,
                            SAMPLE_ANSWERED.strong_answer, SAMPLE_ANSWERED.target_answer,
                            ("strong", "target"))
        evaluating = Contest("sample", SAMPLE_CANDIDATE.instruction,
                             "(the candidate's answer)", "(the reference model's answer)",
                             ("candidate", "reference"))
        return {"judge_filter": (cls(score_scale=10), JudgeTask(filtering, True)),
                "judge_eval": (cls(score_scale=10, explain=True),
                               JudgeTask(evaluating, True))}

    def record_id(self, task: JudgeTask) -> str:
        contest = task.contest
        label = contest.labels[0] if task.first_first else contest.labels[1]
        return f"{contest.key}/{label}-first"

    def prompt(self, task: JudgeTask) -> list[ChatMessage]:
        contest = task.contest
        first, second = ((contest.first, contest.second) if task.first_first
                         else (contest.second, contest.first))
        return pairwise_judge_prompt(contest.instruction, first, second,
                                     self.score_scale, self.explain)

    def answer_type(self, task: JudgeTask) -> type[Answer]:
        return judge_answer(self.score_scale, self.explain)

    def parse(self, task: JudgeTask, answer: JudgeAnswer) -> list[OrderScores]:
        return [OrderScores(task.contest.key, task.first_first,
                            float(answer.assistant_1_score),
                            float(answer.assistant_2_score),
                            getattr(answer, "explanation", "").strip())]


class _Verdict(beam.DoFn):
    def __init__(self, judge_stage: str):
        self._judge_stage = judge_stage

    def setup(self):
        self._incomplete = metrics.flow_counter(metrics.incomplete(self._judge_stage))

    def process(self, keyed):
        _, grouped = keyed
        by_order = {o.first_first: o for o in grouped["orders"]}
        if len(by_order) != 2:
            # A judge call failed for good; its dead letter holds the reason.
            self._incomplete.inc()
            return
        first_first, second_first = by_order[True], by_order[False]
        yield Verdict(
            contest=grouped["contest"][0],
            first_scores=(first_first.assistant_1, second_first.assistant_2),
            second_scores=(first_first.assistant_2, second_first.assistant_1),
            explanations=(first_first.explanation, second_first.explanation))


class JudgeBothOrders(DeadLettering):
    """PCollection[Contest] -> PCollection[Verdict].

    A contest of which a judge call failed for good has no verdict: its dead letter
    says why, and the flow counter `{stage}_incomplete` counts it."""

    def __init__(self, judge: ModelConfig, judge_stage: Judge, run_seed: int = 0):
        super().__init__()
        self._judge = judge
        self._stage = judge_stage
        self._run_seed = run_seed

    def expand(self, contests) -> beam.PCollection:
        judged = (contests
                  | "BothOrders" >> beam.FlatMap(
                      lambda c: [JudgeTask(c, True), JudgeTask(c, False)])
                  | "Judge" >> self.handled(CallModel(
                      self._stage, self._judge, self._run_seed)))
        # Every contest is grouped with its orders, so one whose two judge calls
        # both failed still reaches the verdict, and is counted as incomplete there.
        # The contest (both answers and the caller's record) crosses the shuffle once,
        # its orders as their scores only: about half the bytes of two whole orders.
        verdicts = ({"contest": contests | "KeyContests" >> beam.Map(lambda c: (c.key, c)),
                     "orders": judged
                     | "ByContest" >> beam.Map(lambda o: (o.contest_key, o))}
                    | "GroupOrders" >> beam.CoGroupByKey()
                    | "Verdict" >> beam.ParDo(_Verdict(self._stage.name)))
        return verdicts

