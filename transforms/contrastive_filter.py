"""Contrastive filtering: keep the instructions the target model clearly lacks.

For each candidate, the strong and the target model answer; the judge scores both
answers on a 1..score_scale scale twice, once with the strong answer as "Assistant 1"
and once swapped, and each model's score is the mean over the two orders. With the gap
G = strong - target and threshold θ:

    G >  θ  keep (instruction, strong answer)
    G < -θ  keep (instruction, target answer)   (a regulariser)
    |G| ≤ θ not informative yet: `undecided`, for the improve step

        candidates ─AnswerStrong─AnswerTarget─┬─PairForJudge─Judge(2 orders)─┐
                                              └──────── by candidate id ─────┴─Score─Decide
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import apache_beam as beam

from codeclm_beam import metrics
from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.model.thinking import DEFAULT
from codeclm_beam.prompts import PromptTemplate
from codeclm_beam.records import Candidate
from codeclm_beam.records import Example
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageSpec

UNDECIDED = "undecided"

# Visible tokens of a judgement of two scores as JSON (about 20); the limit sent adds
# the judge's thinking allowance (`codeclm_beam.model.thinking`).
JUDGE_VISIBLE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class JudgeTask:
    candidate: Candidate
    strong_first: bool


@dataclasses.dataclass(frozen=True)
class JudgeScores:
    candidate_id: str
    strong_first: bool
    assistant_1: float
    assistant_2: float

    @property
    def strong(self) -> float:
        return self.assistant_1 if self.strong_first else self.assistant_2

    @property
    def target(self) -> float:
        return self.assistant_2 if self.strong_first else self.assistant_1


class FilterOutput(NamedTuple):
    kept: beam.PCollection  # Example
    undecided: beam.PCollection  # Candidate, scored
    dead_letter: beam.PCollection


def answer_id(candidate: Candidate) -> str:
    return f"{candidate.candidate_id}/i{candidate.iteration}"


def answer_prompt(candidate: Candidate) -> list[ChatMessage]:
    return PromptTemplate.load("answer").messages(instruction=candidate.instruction)


def judge_schema(score_scale: int, explain: bool = False) -> dict:
    # Scores as an enum, not min/max bounds: grammar-constrained backends (llama.cpp)
    # enforce enums, and every backend's structured output supports them. The
    # explanation, when asked, comes after the scores (property order is answer order
    # for constrained decoding).
    score = {"type": "integer", "enum": list(range(1, score_scale + 1))}
    properties = {"assistant_1_score": score, "assistant_2_score": score}
    if explain:
        properties["explanation"] = {"type": "string", "minLength": 1}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def pairwise_judge_prompt(question: str, first: str, second: str, score_scale: int,
                          explain: bool = False) -> list[ChatMessage]:
    """Vicuna's pairwise judge prompt, as the paper uses it: the two scores only in
    filtering (`judge_filter`, Figure 11); the scores first, then an explanation, in
    evaluation (`judge_eval`, Figure 12)."""
    return PromptTemplate.load("judge_eval" if explain else "judge_filter").messages(
        question=question, answer_1=first, answer_2=second, score_scale=score_scale)


def judge_prompt(task: JudgeTask, score_scale: int) -> list[ChatMessage]:
    c = task.candidate
    first, second = ((c.strong_answer, c.target_answer) if task.strong_first
                     else (c.target_answer, c.strong_answer))
    return pairwise_judge_prompt(c.instruction, first, second, score_scale)


class _Decide(beam.DoFn):
    """Joins a candidate with its two judgements and applies the gap rule."""

    def __init__(self, threshold: float, models: dict[str, str]):
        self._threshold = threshold
        self._models = models

    def process(self, joined):
        candidate_id, grouped = joined
        candidates, scores = grouped["candidate"], grouped["scores"]
        orders = {s.strong_first: s for s in scores}
        if len(candidates) != 1 or len(orders) != 2:
            # A judge call failed for good; its dead letter holds the reason, and the
            # candidate is counted as lost to the judge stage.
            metrics.flow_counter(metrics.incomplete("judge")).inc()
            return
        c = candidates[0]
        strong = (orders[True].strong + orders[False].strong) / 2
        target = (orders[True].target + orders[False].target) / 2
        scored = dataclasses.replace(c, strong_score=strong, target_score=target)
        gap = strong - target
        if abs(gap) <= self._threshold:
            yield beam.pvalue.TaggedOutput(UNDECIDED, scored)
            return
        yield Example.of(scored, "strong" if gap > 0 else "target", self._models)


class ContrastiveFilter(beam.PTransform):
    """PCollection[Candidate] -> FilterOutput(kept, undecided, dead_letter)."""

    def __init__(self, strong: ModelConfig, target: ModelConfig, judge: ModelConfig,
                 threshold: float = 3.0, score_scale: int = 10,
                 answer_temperature: float = 0.7, judge_temperature: float = 0.0,
                 max_output_tokens: int = 1024, run_seed: int = 0):
        super().__init__()
        answer_settings = GenerationSettings(answer_temperature, max_output_tokens)

        def answer_spec(name, field):
            return StageSpec(
                name=name, prompt=answer_prompt, record_id=answer_id,
                parse=lambda c, text: [dataclasses.replace(c, **{field: text.strip()})],
                settings=answer_settings, thinking=DEFAULT)

        self._answer_strong = answer_spec("answer_strong", "strong_answer")
        self._answer_target = answer_spec("answer_target", "target_answer")
        self._judge = StageSpec(
            name="judge",
            prompt=lambda task: judge_prompt(task, score_scale),
            parse=lambda task, data: [JudgeScores(
                task.candidate.candidate_id, task.strong_first,
                float(data["assistant_1_score"]), float(data["assistant_2_score"]))],
            record_id=lambda task: (f"{answer_id(task.candidate)}/"
                                    f"{'strong' if task.strong_first else 'target'}-first"),
            schema=judge_schema(score_scale),
            settings=GenerationSettings(judge_temperature, JUDGE_VISIBLE_TOKENS))
        self._models = {"strong": strong, "target": target, "judge": judge}
        self._threshold = threshold
        self._run_seed = run_seed

    def expand(self, candidates) -> FilterOutput:
        models, seed = self._models, self._run_seed
        strong = candidates | "AnswerStrong" >> CallModel(
            self._answer_strong, models["strong"], seed)
        answered = strong.output | "AnswerTarget" >> CallModel(
            self._answer_target, models["target"], seed)
        judged = (answered.output
                  | "PairForJudge" >> beam.FlatMap(
                      lambda c: [JudgeTask(c, True), JudgeTask(c, False)])
                  | "Judge" >> CallModel(self._judge, models["judge"], seed))
        decided = (
            {"candidate": answered.output | "ById" >> beam.Map(
                lambda c: (c.candidate_id, c)),
             "scores": judged.output | "ScoresById" >> beam.Map(
                 lambda s: (s.candidate_id, s))}
            | "JoinScores" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_Decide(
                self._threshold, {k: m.spec.uri for k, m in models.items()})
            ).with_outputs(UNDECIDED, main="kept"))
        dead = ((strong.dead_letter, answered.dead_letter, judged.dead_letter)
                | "DeadLetters" >> beam.Flatten())
        return FilterOutput(decided.kept, decided[UNDECIDED], dead)
