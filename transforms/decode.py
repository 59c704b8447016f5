"""Decode: metadata entry -> basic instructions (iteration 1).

For each metadata entry the strong model writes `ceil(num_instructions / pool size)`
new, diverse, realistic instructions for that use case that need those skills, without
answering them and with no demonstrations: one call per entry, the count fixed by the
schema.
"""
from __future__ import annotations

import dataclasses
import math

import apache_beam as beam

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.prompts import PromptTemplate
from codeclm_beam.records import Candidate
from codeclm_beam.records import Metadata
from codeclm_beam.records import content_id
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageOutput
from codeclm_beam.stage import StageSpec

STAGE = "decode"


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    metadata: Metadata
    count: int


def decode_schema(count: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "instructions": {
                "type": "array", "minItems": count, "maxItems": count,
                "items": {"type": "string", "minLength": 5, "maxLength": 2000},
            },
        },
        "required": ["instructions"],
        "additionalProperties": False,
    }


def decode_prompt(task: DecodeTask) -> list[ChatMessage]:
    entry = task.metadata
    return PromptTemplate.load(STAGE).messages(
        count=task.count, use_case=entry.use_case, skills=", ".join(entry.skills))


def candidate_id(metadata_id: str, index: int) -> str:
    return content_id("c", f"{metadata_id}/{index}")


def parse_instructions(task: DecodeTask, data: dict) -> list[Candidate]:
    entry = task.metadata
    candidates = []
    for index, text in enumerate(data["instructions"]):
        text = text.strip()
        if not text:
            raise ValueError(f"instruction {index} is blank")
        candidates.append(Candidate(candidate_id(entry.metadata_id, index), text,
                                    entry.metadata_id, entry.use_case, entry.skills))
    return candidates


# An instruction rarely needs more than this many tokens; decode's output limit is
# at least this times the count, so a large count is not truncated into a parse failure.
TOKENS_PER_INSTRUCTION = 256


def decode_settings(temperature: float, max_output_tokens: int, count: int
                    ) -> GenerationSettings:
    return GenerationSettings(temperature,
                              max(max_output_tokens, TOKENS_PER_INSTRUCTION * count))


def instructions_per_entry(num_instructions: int, pool_size: int) -> int:
    return math.ceil(num_instructions / pool_size) if pool_size else 0


class DecodeInstructions(beam.PTransform):
    """PCollection[Metadata] -> StageOutput(PCollection[Candidate], dead letters).

    The count per entry depends on the pool's size, known only at run time, so it is
    read as a side input."""

    def __init__(self, model: ModelConfig, num_instructions: int,
                 temperature: float = 0.7, max_output_tokens: int = 2048,
                 run_seed: int = 0):
        super().__init__()
        self._num_instructions = num_instructions
        self._spec = StageSpec(
            name=STAGE,
            prompt=decode_prompt,
            parse=parse_instructions,
            record_id=lambda task: task.metadata.metadata_id,
            schema=lambda task: decode_schema(task.count),
            settings=lambda task: decode_settings(temperature, max_output_tokens,
                                                  task.count))
        self._model = model
        self._run_seed = run_seed

    def expand(self, pool) -> StageOutput:
        pool_size = pool | "PoolSize" >> beam.combiners.Count.Globally()
        tasks = pool | "Count" >> beam.Map(
            lambda entry, size: DecodeTask(
                entry, instructions_per_entry(self._num_instructions, size)),
            beam.pvalue.AsSingleton(pool_size))
        return tasks | "Decode" >> CallModel(self._spec, self._model, self._run_seed)
