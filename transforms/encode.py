"""Encode: seed instruction -> metadata (one use case, 1..max_skills skills).

One strong-model call per seed at temperature 0.7, few-shot with three demonstrations
and no explanation, as in the paper; the answer is JSON constrained by a schema, then
normalised (case, whitespace, and never "skill"/"knowledge" standing as a skill).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Annotated, Optional

from pydantic import Field
from pydantic import StringConstraints

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.transforms.prompt_templates import PromptTemplate
from codeclm_beam.records import SAMPLE_SEED
from codeclm_beam.records import Metadata
from codeclm_beam.records import Seed
from codeclm_beam.records import make_metadata
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import YamlFace
from codeclm_beam.stage import Answer
from codeclm_beam.stage import Stage

STAGE = "encode"

UseCase = Annotated[str, StringConstraints(min_length=1, max_length=80)]
Skill = Annotated[str, StringConstraints(min_length=1, max_length=60)]


class EncodeAnswer(Answer):
    use_case: UseCase
    skills: Annotated[list[Skill], Field(min_length=1, max_length=3)]


@functools.cache
def encode_answer(max_skills: int) -> type[Answer]:
    return EncodeAnswer.variant(
        skills=Annotated[list[Skill], Field(min_length=1, max_length=max_skills)])


@dataclasses.dataclass(frozen=True)
class Encode(Stage):
    """Seed -> Metadata."""

    name: str = STAGE
    settings: GenerationSettings = GenerationSettings(max_output_tokens=256)
    max_skills: int = 3

    yaml = YamlFace("EncodeMetadata", "codeclm_beam.transforms.encode.EncodeMetadata",
                    Seed, Metadata, "Seed rows (seed_id, instruction, source) -> "
                    "metadata rows (use case, skills).")

    @classmethod
    def samples(cls):
        return {"encode": (cls(max_skills=3), SAMPLE_SEED)}

    def record_id(self, seed: Seed) -> str:
        return seed.seed_id

    def prompt(self, seed: Seed) -> list[ChatMessage]:
        """The instruction analyser's prompt: rules, the paper's three demonstrations as
        user/assistant turns (answers in the schema's JSON), then the seed."""
        template = PromptTemplate.load(STAGE)
        messages = [ChatMessage("system",
                                template.system.format(max_skills=self.max_skills))]
        for demonstration in template.demonstration_fields():
            skills = [s.strip() for s in demonstration["skills"].split(",")]
            skills = skills[:self.max_skills]
            messages.append(template.user_message(instruction=demonstration["instruction"]))
            messages.append(ChatMessage("assistant", json.dumps(
                {"use_case": demonstration["use_case"], "skills": skills})))
        messages.append(template.user_message(instruction=seed.instruction))
        return messages

    def answer_type(self, seed: Seed) -> type[Answer]:
        return encode_answer(self.max_skills)

    def answer_problem(self, answer: dict) -> Optional[str]:
        try:
            make_metadata(answer["use_case"], answer["skills"], "seed", self.max_skills)
        except ValueError as unusable:
            return str(unusable)
        return None

    def parse(self, seed: Seed, answer: EncodeAnswer) -> list[Metadata]:
        return [make_metadata(answer.use_case, answer.skills, "seed", self.max_skills,
                              seed.seed_id)]


class EncodeMetadata(CallModel):
    """PCollection[Seed] -> PCollection[Metadata]."""

    def __init__(self, model: ModelConfig, stage: Encode = Encode(), run_seed: int = 0):
        super().__init__(stage, model, run_seed)
