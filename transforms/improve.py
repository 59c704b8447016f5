"""Improve (Self-Rubrics): rewrite an undecided instruction to be harder.

One action is drawn at random from the rubric state of the instruction's metadata
entry, preferring actions not yet applied to this instruction; the strong model, as an
instruction improver, rewrites the instruction by following it. The result goes back to
contrastive filtering as the next iteration, with the chain recorded.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Annotated, Optional

import apache_beam as beam
from pydantic import StringConstraints

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.transforms.prompt_templates import PromptTemplate
from codeclm_beam.records import SAMPLE_ANSWERED
from codeclm_beam.records import Candidate
from codeclm_beam.records import DeadLetter
from codeclm_beam.stage import DEAD_LETTER
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import DeadLettering
from codeclm_beam.stage import Answer
from codeclm_beam.stage import Stage
from codeclm_beam.stage import derive_seed

STAGE = "improve"


class ImproveAnswer(Answer):
    instruction: Annotated[str, StringConstraints(min_length=5, max_length=4000)]


@dataclasses.dataclass(frozen=True)
class Improve(Stage):
    """Candidate with a pending action -> the candidate, rewritten, one iteration on."""

    name: str = STAGE
    settings: GenerationSettings = GenerationSettings()

    @classmethod
    def samples(cls):
        return {"improve": (cls(), SAMPLE_ANSWERED)}

    def record_id(self, candidate: Candidate) -> str:
        return f"{candidate.candidate_id}/i{candidate.iteration}"

    def prompt(self, candidate: Candidate) -> list[ChatMessage]:
        return PromptTemplate.load(STAGE).messages(
            use_case=candidate.use_case, skills=", ".join(candidate.skills),
            instruction=candidate.instruction, action=candidate.pending_action)

    def answer_type(self, candidate: Candidate) -> type[Answer]:
        return ImproveAnswer

    def answer_problem(self, answer: dict) -> Optional[str]:
        return None if str(answer["instruction"]).strip() else \
            "the rewritten instruction is blank"

    def parse(self, candidate: Candidate, answer: ImproveAnswer) -> list[Candidate]:
        rewritten = answer.instruction.strip()
        if not rewritten:
            raise ValueError("the rewritten instruction is blank")
        return [dataclasses.replace(
            candidate, instruction=rewritten, iteration=candidate.iteration + 1,
            actions_applied=candidate.actions_applied + (candidate.pending_action,),
            history=candidate.history + (candidate.instruction,), pending_action=None,
            strong_answer=None, target_answer=None, strong_score=None,
            target_score=None, judge_orders=())]


def choose_action(candidate: Candidate, actions: tuple[str, ...], run_seed: int) -> str:
    fresh = [a for a in actions if a not in candidate.actions_applied]
    rng = random.Random(derive_seed(run_seed, "action", candidate.candidate_id,
                                    str(candidate.iteration)))
    return rng.choice(fresh or list(actions))


class _ChooseAction(beam.DoFn):
    def __init__(self, run_seed: int):
        self._run_seed = run_seed

    def process(self, candidate: Candidate, rubric_state: dict):
        rubric = rubric_state.get(candidate.metadata_id)
        if rubric is None or not rubric.actions:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                STAGE, candidate.candidate_id,
                LookupError(f"no rubric state for metadata {candidate.metadata_id} "
                            "(its rubrics call failed; see the rubrics dead letters)"),
                payload=candidate))
            return
        action = choose_action(candidate, rubric.actions, self._run_seed)
        yield dataclasses.replace(candidate, pending_action=action)


class ImproveInstructions(DeadLettering):
    """PCollection[Candidate] -> PCollection[Candidate], improved.

    `rubric_state` is the PCollection[RubricSet] from GenerateRubrics, read as a side
    input keyed by metadata id."""

    def __init__(self, model: ModelConfig, rubric_state, stage: Improve = Improve(),
                 run_seed: int = 0):
        super().__init__()
        self._rubric_state = rubric_state
        self._stage = stage
        self._model = model
        self._run_seed = run_seed

    def expand(self, candidates) -> beam.PCollection:
        rubrics_by_id = self._rubric_state | "KeyByMetadata" >> beam.Map(
            lambda r: (r.metadata_id, r))
        chosen = candidates | "ChooseAction" >> beam.ParDo(
            _ChooseAction(self._run_seed), beam.pvalue.AsDict(rubrics_by_id)
        ).with_outputs(DEAD_LETTER, main="main")
        self.dead_letters(chosen[DEAD_LETTER])
        return chosen.main | "Rewrite" >> self.handled(CallModel(
            self._stage, self._model, self._run_seed))
