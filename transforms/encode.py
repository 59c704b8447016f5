"""Encode: seed instruction -> metadata (one use case, 1..max_skills skills).

One strong-model call per seed at temperature 0.7, few-shot with three demonstrations
and no explanation, as in the paper; the answer is JSON constrained by a schema, then
normalised (case, whitespace, and never "skill"/"knowledge" standing as a skill).
"""
from __future__ import annotations

import json
import re
from typing import Iterable

import apache_beam as beam

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.prompts import PromptTemplate
from codeclm_beam.records import Metadata
from codeclm_beam.records import Seed
from codeclm_beam.records import content_id
from codeclm_beam.stage import CallModel
from codeclm_beam.stage import StageOutput
from codeclm_beam.stage import StageSpec

STAGE = "encode"

# Words that describe a skill instead of naming it, as the paper's prompt forbids:
# "skill(s)" and "knowledge" anywhere; "understanding of", "ability to", "experience
# with"... before what is needed (but "natural language understanding" and "user
# experience design" are names); an adjective of degree at the start ("strong", ...).
_BANNED = re.compile(r"\b(skills?|knowledge)\b", re.IGNORECASE)
_DESCRIBING_PREFIX = re.compile(
    r"^(?:(?:basic|good|strong|solid|in-depth|thorough)\s+)?"
    r"(?:understanding|ability|abilities|proficiency|expertise|familiarity|experience|"
    r"competence|command|mastery)\s+(?:of|in|with|to|for|about|on)\s+", re.IGNORECASE)
_DEGREE = re.compile(r"^(?:basic|good|strong|solid|in-depth|thorough)\s+", re.IGNORECASE)
# Words that cannot start or end a skill once the describing words are gone.
_DANGLING = {"of", "in", "on", "for", "and", "or", "with", "to", "about", "the", "a",
             "an", "at", "as", "by"}
MAX_SKILL_WORDS = 3


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


def normalize_phrase(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    return text.strip(" .,;:!?\"'`-_*()[]{}")


def normalize_skill(skill: str) -> str:
    """A skill as the paper asks for it: what is needed, named in at most three words,
    with no describing words ("skill", "knowledge", "ability to", ...) and no
    preposition or article left dangling at either end; "" when nothing is left (then
    the skill is dropped)."""
    text = normalize_phrase(_BANNED.sub(" ", str(skill)))
    text = _DEGREE.sub("", _DESCRIBING_PREFIX.sub("", text))
    words = text.split()
    while words and words[0] in _DANGLING:
        words.pop(0)
    while words and words[-1] in _DANGLING:
        words.pop()
    if len(words) > MAX_SKILL_WORDS:
        # Too long to be a name: linking words go first ("creative writing and
        # storytelling" -> "creative writing storytelling"), then all but three.
        words = [w for w in words if w not in _DANGLING][:MAX_SKILL_WORDS]
    return normalize_phrase(" ".join(words))


def normalize_skills(skills: Iterable[str], max_skills: int) -> tuple[str, ...]:
    """Normalised, de-duplicated skills (`normalize_skill`); the ones that come out
    empty are dropped, and at most `max_skills` are kept."""
    seen = []
    for skill in skills:
        cleaned = normalize_skill(skill)
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
