"""Rubrics and actions: once per metadata entry, the rubric state the improve step reads.

The strong model, as a domain expert judging instruction difficulty, writes
`num_rubrics` rubrics for what makes an instruction of this use case and skills hard,
and one action per rubric that would make an instruction harder.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Optional

from pydantic import Field
from pydantic import StringConstraints

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.transforms.prompt_templates import PromptTemplate
from codeclm_beam.records import SAMPLE_METADATA
from codeclm_beam.records import Metadata
from codeclm_beam.records import RubricSet
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import YamlFace
from codeclm_beam.stage import Answer
from codeclm_beam.stage import Stage

STAGE = "rubrics"


Phrase = Annotated[str, StringConstraints(min_length=3, max_length=300)]


class RubricAndAction(Answer):
    rubric: Phrase
    action: Phrase


class RubricsAnswer(Answer):
    rubrics: list[RubricAndAction]


@functools.cache
def rubrics_answer(num_rubrics: int) -> type[Answer]:
    return RubricsAnswer.variant(rubrics=Annotated[
        list[RubricAndAction], Field(min_length=num_rubrics, max_length=num_rubrics)])


@dataclasses.dataclass(frozen=True)
class Rubrics(Stage):
    """Metadata -> RubricSet."""

    name: str = STAGE
    settings: GenerationSettings = GenerationSettings()
    num_rubrics: int = 4

    yaml = YamlFace("GenerateRubrics", "codeclm_beam.transforms.rubrics.GenerateRubrics",
                    Metadata, RubricSet, "Pool entries -> their rubrics and actions (the "
                    "improve step's side input).")

    @classmethod
    def samples(cls):
        return {"rubrics": (cls(num_rubrics=4), SAMPLE_METADATA)}

    def record_id(self, entry: Metadata) -> str:
        return entry.metadata_id

    def prompt(self, entry: Metadata) -> list[ChatMessage]:
        return PromptTemplate.load(STAGE).messages(
            num_rubrics=self.num_rubrics, use_case=entry.use_case,
            skills=", ".join(entry.skills))

    def answer_type(self, entry: Metadata) -> type[Answer]:
        return rubrics_answer(self.num_rubrics)

    def answer_problem(self, answer: dict) -> Optional[str]:
        if not all(str(item["action"]).strip() for item in answer["rubrics"]):
            return "an action is blank"
        return None

    def parse(self, entry: Metadata, answer: RubricsAnswer) -> list[RubricSet]:
        rubrics = tuple(" ".join(item.rubric.split()) for item in answer.rubrics)
        actions = tuple(" ".join(item.action.split()) for item in answer.rubrics)
        if not all(actions):
            raise ValueError("an action is blank")
        return [RubricSet(entry.metadata_id, entry.use_case, entry.skills, rubrics,
                          actions)]


class GenerateRubrics(CallModel):
    """PCollection[Metadata] -> PCollection[RubricSet]."""

    def __init__(self, model: ModelConfig, stage: Rubrics = Rubrics(), run_seed: int = 0):
        super().__init__(stage, model, run_seed)
