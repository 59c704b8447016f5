"""Prompt templates: one readable file per stage, `transforms/prompts/STAGE.txt`.

A template is plain text in sections:

    # comments (the file's head)
    [system]
    ...text with {placeholders}...
    [demonstration]          (any number; few-shot turns, as `key: value` lines)
    instruction: ...
    use_case: ...
    [user]
    ...text with {placeholders}...

Placeholders are `str.format` fields, so a stage fills them from its record and a value
holding braces stays as it is. `codeclm-beam prompts [STAGE]` prints every stage's
messages rendered on a sample record.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re

from codeclm_beam.model.types import ChatMessage

PROMPTS_PACKAGE = "codeclm_beam.transforms"
_SECTION = re.compile(r"^\[(system|user|demonstration)\]\s*$")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    stage: str
    system: str
    user: str
    demonstrations: tuple[tuple[tuple[str, str], ...], ...] = ()

    @classmethod
    @functools.lru_cache(maxsize=None)
    def load(cls, stage: str) -> "PromptTemplate":
        text = (importlib.resources.files(PROMPTS_PACKAGE) / "prompts" / f"{stage}.txt"
                ).read_text(encoding="utf-8")
        return cls.parse(stage, text)

    @classmethod
    def parse(cls, stage: str, text: str) -> "PromptTemplate":
        sections: list[tuple[str, list[str]]] = []
        for line in text.splitlines():
            match = _SECTION.match(line)
            if match:
                sections.append((match.group(1), []))
            elif sections:
                sections[-1][1].append(line)
            elif line.strip() and not line.startswith("#"):
                raise ValueError(f"prompt {stage}: text before the first section")
        bodies = {"system": "", "user": ""}
        demonstrations = []
        for name, lines in sections:
            body = "\n".join(lines).strip()
            if name == "demonstration":
                fields = []
                for line in body.splitlines():
                    key, colon, value = line.partition(":")
                    if not colon:
                        raise ValueError(f"prompt {stage}: demonstration line {line!r} "
                                         "is not 'key: value'")
                    fields.append((key.strip(), value.strip()))
                demonstrations.append(tuple(fields))
            else:
                bodies[name] = body
        if not bodies["user"]:
            raise ValueError(f"prompt {stage}: no [user] section")
        return cls(stage, bodies["system"], bodies["user"], tuple(demonstrations))

    def demonstration_fields(self) -> list[dict[str, str]]:
        return [dict(fields) for fields in self.demonstrations]

    def user_message(self, **fields) -> ChatMessage:
        return ChatMessage("user", self.user.format(**fields))

    def messages(self, **fields) -> list[ChatMessage]:
        """System and user messages filled from `fields` (no demonstrations: a
        few-shot stage interleaves them itself, as its answers are its own format)."""
        system = [ChatMessage("system", self.system.format(**fields))] if self.system \
            else []
        return system + [self.user_message(**fields)]
