"""Decode: metadata entry -> basic instructions (iteration 1).

For each metadata entry the strong model writes `ceil(num_instructions / pool size)`
new, diverse, realistic instructions for that use case that need those skills, without
answering them and with no demonstrations: one call per entry, the count fixed by the
schema.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Annotated, Optional

import apache_beam as beam
from pydantic import Field
from pydantic import StringConstraints

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.transforms.prompt_templates import PromptTemplate
from codeclm_beam.records import SAMPLE_METADATA
from codeclm_beam.records import Candidate
from codeclm_beam.records import Metadata
from codeclm_beam.records import content_id
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import YamlFace
from codeclm_beam.stage import DeadLettering
from codeclm_beam.stage import Answer
from codeclm_beam.stage import Stage

STAGE = "decode"


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    metadata: Metadata
    count: int


Instruction = Annotated[str, StringConstraints(min_length=5, max_length=2000)]


class DecodeAnswer(Answer):
    instructions: list[Instruction]


@functools.cache
def decode_answer(count: int) -> type[Answer]:
    """Exactly `count` instructions: the count is set by the pool's size."""
    return DecodeAnswer.variant(
        instructions=Annotated[list[Instruction], Field(min_length=count, max_length=count)])


def candidate_id(metadata_id: str, index: int) -> str:
    return content_id("c", f"{metadata_id}/{index}")


# An instruction rarely needs more than this many tokens; decode's output limit is
# at least this times the count, so a large count is not truncated into a parse failure.
TOKENS_PER_INSTRUCTION = 256


# Instructions one decode call may be asked to write (each up to ~256 tokens): past
# this, a JSON answer of that length is often cut off or repeats itself.
MAX_INSTRUCTIONS_PER_DECODE_CALL = 64


def instructions_per_entry(num_instructions: int, pool_size: int) -> int:
    return math.ceil(num_instructions / pool_size) if pool_size else 0


@dataclasses.dataclass(frozen=True)
class Decode(Stage):
    """DecodeTask (an entry and its count) -> Candidates."""

    name: str = STAGE
    settings: GenerationSettings = GenerationSettings(max_output_tokens=2048)

    yaml = YamlFace("DecodeInstructions",
                    "codeclm_beam.transforms.decode.DecodeInstructions", Metadata,
                    Candidate, "Pool entries -> candidate instructions (num_instructions "
                    "over the pool).", leading=("num_instructions",))

    @classmethod
    def samples(cls):
        return {"decode": (cls(), DecodeTask(SAMPLE_METADATA, 5))}

    def record_id(self, task: DecodeTask) -> str:
        return task.metadata.metadata_id

    def prompt(self, task: DecodeTask) -> list[ChatMessage]:
        entry = task.metadata
        return PromptTemplate.load(STAGE).messages(
            count=task.count, use_case=entry.use_case, skills=", ".join(entry.skills))

    def answer_type(self, task: DecodeTask) -> type[Answer]:
        return decode_answer(task.count)

    def answer_problem(self, answer: dict) -> Optional[str]:
        blank = [i for i, text in enumerate(answer["instructions"]) if not str(text).strip()]
        return f"instruction {blank[0]} is blank" if blank else None

    def parse(self, task: DecodeTask, answer: DecodeAnswer) -> list[Candidate]:
        entry = task.metadata
        candidates = []
        for index, text in enumerate(answer.instructions):
            text = text.strip()
            if not text:
                raise ValueError(f"instruction {index} is blank")
            candidates.append(Candidate(candidate_id(entry.metadata_id, index), text,
                                        entry.metadata_id, entry.use_case, entry.skills))
        return candidates

    def settings_for(self, task: DecodeTask) -> GenerationSettings:
        # At least TOKENS_PER_INSTRUCTION per instruction asked for.
        return dataclasses.replace(self.settings, max_output_tokens=max(
            self.settings.max_output_tokens, TOKENS_PER_INSTRUCTION * task.count))


class DecodeInstructions(DeadLettering):
    """PCollection[Metadata] -> PCollection[Candidate].

    The count per entry depends on the pool's size, known only at run time, so it is
    read as a side input: `pool_size` when the caller has it (BuildMetadataPool's
    `with_size`), else counted here."""

    def __init__(self, model: ModelConfig, num_instructions: int,
                 stage: Decode = Decode(), run_seed: int = 0,
                 pool_size: Optional[beam.PCollection] = None):
        super().__init__()
        self._num_instructions = num_instructions
        self._stage = stage
        self._model = model
        self._run_seed = run_seed
        self._pool_size = pool_size

    def expand(self, pool) -> beam.PCollection:
        pool_size = self._pool_size
        if pool_size is None:
            # Without defaults: an empty pool has no entry to read the size with.
            pool_size = pool | "PoolSize" >> beam.CombineGlobally(
                beam.combiners.CountCombineFn()).without_defaults()
        # A local, not `self`: the lambda is pickled, and an applied composite drags
        # its whole pipeline along (a user's pipeline failed to pickle on it).
        wanted = self._num_instructions
        tasks = pool | "Count" >> beam.Map(
            lambda entry, size: DecodeTask(entry, instructions_per_entry(wanted, size)),
            beam.pvalue.AsSingleton(pool_size, default_value=0))
        return tasks | "Decode" >> self.handled(CallModel(
            self._stage, self._model, self._run_seed))
