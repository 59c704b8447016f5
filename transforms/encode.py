"""Encode: seed instruction -> metadata (one use case, 1..max_skills skills).

One strong-model call per seed at temperature 0.7, few-shot with three demonstrations
and no explanation, as in the paper; the answer is JSON constrained by a schema, then
normalised (case, whitespace, and never "skill"/"knowledge" standing as a skill).
"""
from __future__ import annotations

import re
from typing import Iterable

import apache_beam as beam

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.records import Metadata
from codeclm_beam.records import Seed
from codeclm_beam.records import content_id
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageOutput
from codeclm_beam.stage import StageSpec

STAGE = "encode"

_SYSTEM = (
    "You analyse user instructions. For an instruction, name its use case (the kind "
    "of task, in a few words) and the skills a responder needs (each 2-3 words). "
    "Answer with JSON only, no explanation.")

_DEMONSTRATIONS = (
    ("Write a Python function that returns the n-th Fibonacci number using memoization.",
     "code generation", ["python", "dynamic programming"]),
    ("I'm opening a small bakery downtown. Draft a one-page business plan that covers "
     "the target customers and the main competitors.",
     "business plan development", ["market research", "financial planning",
                                   "business writing"]),
    ("Pretend you are a medieval innkeeper and greet a tired traveller who just "
     "walked in from the rain.",
     "role-play", ["character voice", "creative writing"]),
)

_GENERIC_WORDS = re.compile(r"\b(skills?|knowledge)\b", re.IGNORECASE)


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
    import json
    messages = [ChatMessage("system", _SYSTEM)]
    for instruction, use_case, skills in _DEMONSTRATIONS:
        messages.append(ChatMessage("user", _ask(instruction, max_skills)))
        messages.append(ChatMessage("assistant", json.dumps(
            {"use_case": use_case, "skills": skills[:max_skills]})))
    messages.append(ChatMessage("user", _ask(seed.instruction, max_skills)))
    return messages


def _ask(instruction: str, max_skills: int) -> str:
    return (f"Instruction:\n{instruction}\n\nGive exactly one use case and 1 to "
            f"{max_skills} skills.")


def normalize_phrase(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    return text.strip(" .,;:!?\"'`-_*()[]{}")


def normalize_skills(skills: Iterable[str], max_skills: int) -> tuple[str, ...]:
    """Lower-cased, de-duplicated skills with "skill"/"knowledge" removed as words;
    a skill that was nothing but those words disappears."""
    seen = []
    for skill in skills:
        cleaned = normalize_phrase(_GENERIC_WORDS.sub(" ", str(skill)))
        cleaned = normalize_phrase(re.sub(r"\b(of|in|for|and)$", "", cleaned))
        if cleaned and cleaned not in seen:
            seen.append(cleaned)
    return tuple(seen[:max_skills])


def metadata_id(use_case: str, skills: tuple[str, ...]) -> str:
    key = use_case + "\x1f" + "\x1f".join(sorted(skills))
    return content_id("m", key)


def make_metadata(use_case: str, skills: Iterable[str], origin: str, max_skills: int,
                  seed_id: str | None = None) -> Metadata:
    """Normalised metadata, or ValueError naming what is unusable."""
    use_case = normalize_phrase(use_case)
    if not use_case:
        raise ValueError("empty use case")
    normalized = normalize_skills(skills, max_skills)
    if not normalized:
        raise ValueError(f"no usable skill in {list(skills)!r}")
    return Metadata(metadata_id(use_case, normalized), use_case, normalized, origin,
                    seed_id)


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
