"""Rubrics and actions: once per metadata entry, the rubric state the improve step reads.

The strong model, as a domain expert judging instruction difficulty, writes
`num_rubrics` rubrics for what makes an instruction of this use case and skills hard,
and one action per rubric that would make an instruction harder.
"""
from __future__ import annotations

import apache_beam as beam

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.prompts import PromptTemplate
from codeclm_beam.records import Metadata
from codeclm_beam.records import RubricSet
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageOutput
from codeclm_beam.stage import StageSpec

STAGE = "rubrics"

def rubrics_schema(num_rubrics: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "rubrics": {
                "type": "array", "minItems": num_rubrics, "maxItems": num_rubrics,
                "items": {
                    "type": "object",
                    "properties": {
                        "rubric": {"type": "string", "minLength": 3, "maxLength": 300},
                        "action": {"type": "string", "minLength": 3, "maxLength": 300},
                    },
                    "required": ["rubric", "action"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["rubrics"],
        "additionalProperties": False,
    }


def rubrics_prompt(entry: Metadata, num_rubrics: int) -> list[ChatMessage]:
    return PromptTemplate.load(STAGE).messages(
        num_rubrics=num_rubrics, use_case=entry.use_case, skills=", ".join(entry.skills))


def parse_rubrics(entry: Metadata, data: dict) -> list[RubricSet]:
    rubrics = tuple(" ".join(item["rubric"].split()) for item in data["rubrics"])
    actions = tuple(" ".join(item["action"].split()) for item in data["rubrics"])
    if not all(actions):
        raise ValueError("an action is blank")
    return [RubricSet(entry.metadata_id, entry.use_case, entry.skills, rubrics, actions)]


class GenerateRubrics(beam.PTransform):
    """PCollection[Metadata] -> StageOutput(PCollection[RubricSet], dead letters)."""

    def __init__(self, model: ModelConfig, num_rubrics: int = 4, temperature: float = 0.7,
                 max_output_tokens: int = 1024, run_seed: int = 0):
        super().__init__()
        self._spec = StageSpec(
            name=STAGE,
            prompt=lambda entry: rubrics_prompt(entry, num_rubrics),
            parse=parse_rubrics,
            record_id=lambda entry: entry.metadata_id,
            schema=rubrics_schema(num_rubrics),
            settings=GenerationSettings(temperature, max_output_tokens))
        self._model = model
        self._run_seed = run_seed

    def expand(self, pool) -> StageOutput:
        return pool | "Rubrics" >> CallModel(self._spec, self._model, self._run_seed)
