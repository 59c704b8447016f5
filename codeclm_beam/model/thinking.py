"""Thinking control per model, and output limits that leave room for it.

Gemini 2.5 and 3 think before they answer. Thought tokens count against
`maxOutputTokens` and are billed as output: a call that asks for 32 tokens gets its
budget spent on thinking and comes back with `finishReason: MAX_TOKENS` and no text.
So every request names how much the model may think, and the limit sent on the wire is

    max_output_tokens (wire) = visible budget of the stage + thinking allowance

where the thinking allowance is the budget asked for (2.5), the allowance of the level
asked for (3.x, `LEVEL_ALLOWANCE`), or the family's largest budget when the model
decides (dynamic thinking, or the model's default), capped at the model's output
limit. A ceiling costs nothing: only the tokens generated are billed.

What each family takes, as Google documents it (re-check the model pages when a new
model ships; `gemini_family` returns None for a model not in this table, and then
settings pass through unchecked and no allowance is added):

    2.5 Pro         thinking_budget 128..32768 or -1 (dynamic, default); never 0
    2.5 Flash       thinking_budget 0..24576 or -1 (dynamic, default); 0 = off
    2.5 Flash-Lite  thinking_budget 0 or 512..24576 or -1; off by default
    3 Pro           thinking_level low | high; default high
    3 Flash         thinking_level minimal | low | medium | high; default high

A request sets `thinking_budget` or `thinking_level`, never both (Vertex answers 400).

How a role's setting is written (`--strong_thinking`, `--target_thinking`,
`--judge_thinking`): a budget in tokens (`1024`, `-1` or `dynamic`, `0` or `off`), a
level (`minimal`, `low`, `medium`, `high`), `least` (the least the model allows) or
`default` (send nothing: the model's own default). Left unset, each stage picks: the
structured codec stages and the judge think as little as the model allows, the answers
of the strong and target models keep the model's default (`Stage.thinking`).
OpenAI-compatible servers take a level as `reasoning_effort`; embedded llama.cpp models
do not think, and refuse an explicit setting.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from codeclm_beam.model.errors import ConfigurationError

LEVELS = ("minimal", "low", "medium", "high")
# Stage defaults and the two keywords a user may write instead of a budget or level.
LEAST = "least"
DEFAULT = "default"
# Thinking room a level gets in the output limit (its allowance, not a cap the model
# obeys: levels have no documented token counts).
LEVEL_ALLOWANCE = {"minimal": 1024, "low": 4096, "medium": 16384, "high": 32768}
# Reasoning efforts OpenAI-compatible servers take.
REASONING_EFFORTS = ("none", *LEVELS)


class ThinkingNotSupported(ConfigurationError):
    """A thinking setting this model cannot take; raised before any call."""


@dataclasses.dataclass(frozen=True)
class GeminiFamily:
    name: str
    pattern: str  # matched at the start of the model name
    # 2.5: the positive budgets allowed; None for families that take levels.
    budget_range: Optional[tuple[int, int]] = None
    can_switch_off: bool = False
    # 3.x: the levels allowed.
    levels: tuple[str, ...] = ()
    # What the model does when nothing is sent: "dynamic", "off" or a level.
    default: str = "dynamic"
    output_limit: int = 65536

    @property
    def least(self) -> "Thinking":
        if self.levels:
            return Thinking(level=self.levels[0])
        return Thinking(budget=0 if self.can_switch_off else self.budget_range[0])

    def allows(self) -> str:
        if self.levels:
            return f"thinking_level {' | '.join(self.levels)} (default {self.default})"
        low, high = self.budget_range
        off = "0 (off) or " if self.can_switch_off else ""
        return (f"thinking_budget {off}{low}..{high} or -1 (dynamic); default "
                f"{self.default}")

    def allowance(self, thinking: "Thinking") -> int:
        """Thinking room to add to the visible budget."""
        if thinking.level:
            return LEVEL_ALLOWANCE[thinking.level]
        if thinking.budget is not None:
            return self.max_budget if thinking.budget < 0 else thinking.budget
        if self.default == "off":
            return 0
        if self.default in LEVEL_ALLOWANCE:
            return LEVEL_ALLOWANCE[self.default]
        return self.max_budget

    @property
    def max_budget(self) -> int:
        return self.budget_range[1] if self.budget_range else LEVEL_ALLOWANCE["high"]


# Most specific first: "flash-lite" before "flash".
GEMINI_FAMILIES = (
    GeminiFamily("Gemini 2.5 Flash-Lite", "gemini-2.5-flash-lite", (512, 24576),
                 can_switch_off=True, default="off"),
    GeminiFamily("Gemini 2.5 Flash", "gemini-2.5-flash", (1, 24576), can_switch_off=True),
    GeminiFamily("Gemini 2.5 Pro", "gemini-2.5-pro", (128, 32768)),
    GeminiFamily("Gemini 3 Flash", r"gemini-3(\.\d+)?-flash", levels=LEVELS,
                 default="high"),
    GeminiFamily("Gemini 3 Pro", r"gemini-3(\.\d+)?-pro", levels=("low", "high"),
                 default="high"),
)


def gemini_family(model: str) -> Optional[GeminiFamily]:
    name = model.rsplit("/", 1)[-1].lower()  # "publishers/google/models/x" -> "x"
    for family in GEMINI_FAMILIES:
        if re.match(family.pattern, name):
            return family
    return None


@dataclasses.dataclass(frozen=True)
class Thinking:
    """What goes on the wire: a budget, a level, or neither (the model's default)."""

    budget: Optional[int] = None
    level: Optional[str] = None

    def __post_init__(self):
        if self.budget is not None and self.level is not None:
            raise ThinkingNotSupported("a thinking budget and a thinking level cannot "
                                       "both be set (Vertex AI answers 400)")


def parse_thinking(text: Optional[str]) -> Optional[str]:
    """A role's setting as written on the command line, normalised; None when unset.
    Raises ThinkingNotSupported for text that is none of the accepted forms."""
    if text is None or str(text).strip() == "":
        return None
    value = str(text).strip().lower()
    aliases = {"dynamic": "-1", "off": "0", "min": LEAST, "minimum": LEAST}
    value = aliases.get(value, value)
    if value in (LEAST, DEFAULT, "none", *LEVELS) or re.fullmatch(r"-?\d+", value):
        return value
    raise ThinkingNotSupported(
        f"thinking setting {text!r} is not a budget in tokens (e.g. 1024, -1 or "
        f"dynamic, 0 or off), a level ({', '.join(LEVELS)}), '{LEAST}' or '{DEFAULT}'")


def resolve_thinking(backend: str, model: str, setting: Optional[str],
                     stage_default: str) -> Thinking:
    """The wire setting for one model and stage, or ThinkingNotSupported naming the
    model and what it allows. `setting` is the role's (parsed) setting, None when the
    user gave none; `stage_default` is LEAST or DEFAULT."""
    value = parse_thinking(setting) or stage_default
    if backend in ("vertex", "gemini"):
        return _resolve_gemini(model, value)
    if value in (LEAST, DEFAULT):
        return Thinking()
    where = f"{backend}:{model}"
    if backend == "openai":
        if value not in REASONING_EFFORTS:
            raise ThinkingNotSupported(
                f"{where}: OpenAI-compatible servers take a reasoning effort "
                f"({' | '.join(REASONING_EFFORTS)}), not a token budget ({value})")
        return Thinking(level=value)
    if backend == "llamacpp":
        raise ThinkingNotSupported(
            f"{where}: embedded llama.cpp models do not think; leave the thinking "
            "setting unset (or 'default')")
    # custom backends receive the setting and decide what it means.
    return Thinking(budget=int(value)) if re.fullmatch(r"-?\d+", value) else \
        Thinking(level=value)


def _resolve_gemini(model: str, value: str) -> Thinking:
    family = gemini_family(model)
    if value == DEFAULT:
        return Thinking()
    if family is None:
        # A model this table does not know: pass an explicit setting through, and
        # send nothing for "least" (it may not think at all).
        if value == LEAST:
            return Thinking()
        return Thinking(budget=int(value)) if re.fullmatch(r"-?\d+", value) else \
            Thinking(level=value)
    if value == LEAST:
        return family.least

    def refuse(why: str) -> ThinkingNotSupported:
        return ThinkingNotSupported(
            f"{model} ({family.name}) cannot take thinking {value!r}: {why}; it "
            f"allows {family.allows()}")

    if re.fullmatch(r"-?\d+", value):
        budget = int(value)
        if family.levels:
            raise refuse("the Gemini 3 family takes a thinking level, not a budget")
        low, high = family.budget_range
        if budget == -1 or (budget == 0 and family.can_switch_off) or \
                low <= budget <= high:
            return Thinking(budget=budget)
        if budget == 0:
            raise refuse("thinking cannot be switched off on this model")
        raise refuse("the budget is out of range")
    if not family.levels:
        raise refuse("the Gemini 2.5 family takes a thinking budget in tokens, not a "
                     "level")
    if value not in family.levels:
        raise refuse("that level is not offered")
    return Thinking(level=value)


def output_token_limit(backend: str, model: str, visible: int,
                       thinking: Thinking) -> int:
    """The `max_output_tokens` to send: the stage's visible budget plus the thinking
    the request allows, within the model's output limit."""
    if backend in ("vertex", "gemini"):
        family = gemini_family(model)
        if family is None:
            return visible
        return min(family.output_limit, visible + family.allowance(thinking))
    if backend == "openai" and thinking.level in LEVEL_ALLOWANCE:
        # Reasoning tokens count against an OpenAI-style max_tokens too.
        return visible + LEVEL_ALLOWANCE[thinking.level]
    return visible
