"""Contrastive filtering: keep the instructions the target model clearly lacks.

For each candidate, the strong and the target model answer; the judge scores both
answers on a 1..score_scale scale in both orders (`JudgeBothOrders`), and each model's
score is its mean over the two orders. With the gap G = strong - target and
threshold θ:

    G >  θ  keep (instruction, strong answer)
    G < -θ  keep (instruction, target answer)   (a regulariser)
    |G| ≤ θ not informative yet: `undecided`, for the improve step

    candidates ─AnswerStrong─AnswerTarget─Contest─JudgeBothOrders─Decide─┬─ kept
                                                                         └─ undecided
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import apache_beam as beam

from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.records import Candidate
from codeclm_beam.records import Example
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import DeadLettering
from codeclm_beam.transforms.judge import AnswerInstruction
from codeclm_beam.transforms.judge import Contest
from codeclm_beam.transforms.judge import Judge
from codeclm_beam.transforms.judge import JudgeBothOrders
from codeclm_beam.transforms.judge import Verdict

UNDECIDED = "undecided"
# The score gap θ a kept pair must exceed: the paper's default on a 10-point scale.
THRESHOLD = 3.0


class FilterOutput(NamedTuple):
    kept: beam.PCollection  # Example
    undecided: beam.PCollection  # Candidate, scored


def contest(candidate: Candidate) -> Contest:
    return Contest(candidate.answer_key, candidate.instruction, candidate.strong_answer,
                   candidate.target_answer, ("strong", "target"), payload=candidate)


class _Decide(beam.DoFn):
    """The gap rule on a candidate's verdict."""

    def __init__(self, threshold: float, models: dict[str, str]):
        self._threshold = threshold
        self._models = models

    def process(self, verdict: Verdict):
        scored = dataclasses.replace(
            verdict.contest.payload, strong_score=verdict.first_mean,
            target_score=verdict.second_mean,
            judge_orders=(verdict.first_scores[0], verdict.second_scores[0],
                          verdict.first_scores[1], verdict.second_scores[1]))
        if abs(verdict.gap) <= self._threshold:
            yield beam.pvalue.TaggedOutput(UNDECIDED, scored)
            return
        yield Example.of(scored, "strong" if verdict.gap > 0 else "target", self._models)


class ContrastiveFilter(DeadLettering):
    """PCollection[Candidate] -> FilterOutput(kept, undecided)."""

    def __init__(self, strong: ModelConfig, target: ModelConfig, judge: ModelConfig, *,
                 threshold: float = THRESHOLD,
                 answers: GenerationSettings = AnswerInstruction.settings,
                 judging: Judge = Judge(), run_seed: int = 0):
        super().__init__()
        self._answer_strong = AnswerInstruction("answer_strong", answers, "strong_answer")
        self._answer_target = AnswerInstruction("answer_target", answers, "target_answer")
        self._judge = judging
        self._models = {"strong": strong, "target": target, "judge": judge}
        self._threshold = threshold
        self._run_seed = run_seed

    def expand(self, candidates) -> FilterOutput:
        models, seed = self._models, self._run_seed
        decided = (candidates
                   | "AnswerStrong" >> self.handled(CallModel(
                       self._answer_strong, models["strong"], seed))
                   | "AnswerTarget" >> self.handled(CallModel(
                       self._answer_target, models["target"], seed))
                   | "Contest" >> beam.Map(contest)
                   | "JudgeBothOrders" >> self.handled(JudgeBothOrders(
                       models["judge"], self._judge, seed))
                   | "Decide" >> beam.ParDo(_Decide(
            self._threshold, {k: m.spec.uri for k, m in models.items()})
        ).with_outputs(UNDECIDED, main="kept"))
        return FilterOutput(decided.kept, decided[UNDECIDED])
