"""Encode: seed instruction -> metadata (one use case, 1..max_skills skills).

One strong-model call per seed at temperature 0.7, few-shot with three demonstrations
and no explanation, as in the paper; the answer is JSON constrained by a schema, then
normalised (case, whitespace, and never "skill"/"knowledge" standing as a skill).
"""
from __future__ import annotations

import json

import apache_beam as beam

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.prompts import PromptTemplate
from codeclm_beam.records import Seed
from codeclm_beam.records import make_metadata
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageOutput
from codeclm_beam.stage import StageSpec

STAGE = "encode"

def encode_schema(max_skills: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "use_case": {"type": "string", "minLength": 1, "maxLength": 80},
            "skills": {"type": "array", "minItems": 1, "maxItems": max_skills,
                       "items": {"type": "string", "minLength": 1, "maxLength": 60}},
        },
        "required": ["use_case", "skills"],
        "additionalProperties": False,
    }


def encode_prompt(seed: Seed, max_skills: int) -> list[ChatMessage]:
    """The instruction analyser's prompt: rules, the paper's three demonstrations as
    user/assistant turns (answers in the schema's JSON), then the seed."""
    template = PromptTemplate.load(STAGE)
    messages = [ChatMessage("system", template.system.format(max_skills=max_skills))]
    for demonstration in template.demonstration_fields():
        skills = [s.strip() for s in demonstration["skills"].split(",")][:max_skills]
        messages.append(template.user_message(instruction=demonstration["instruction"]))
        messages.append(ChatMessage("assistant", json.dumps(
            {"use_case": demonstration["use_case"], "skills": skills})))
    messages.append(template.user_message(instruction=seed.instruction))
    return messages


class EncodeMetadata(beam.PTransform):
    """PCollection[Seed] -> StageOutput(PCollection[Metadata], dead letters)."""

    def __init__(self, model: ModelConfig, max_skills: int = 3, temperature: float = 0.7,
                 max_output_tokens: int = 256, run_seed: int = 0):
        super().__init__()
        self._spec = StageSpec(
            name=STAGE,
            prompt=lambda seed: encode_prompt(seed, max_skills),
            parse=lambda seed, data: [make_metadata(
                data["use_case"], data["skills"], "seed", max_skills, seed.seed_id)],
            record_id=lambda seed: seed.seed_id,
            schema=encode_schema(max_skills),
            settings=GenerationSettings(temperature, max_output_tokens))
        self._model = model
        self._run_seed = run_seed

    def expand(self, seeds) -> StageOutput:
        return seeds | "Encode" >> CallModel(self._spec, self._model, self._run_seed)
