"""Training data for tuning the target on a run's kept pairs, checked against Vertex AI's
documented limits before anything is uploaded or paid for.

Supervised tuning learns instruction -> kept answer. Preference tuning learns from the
pair contrastive filtering produced anyway: the answer the judge preferred (chosen,
score 1) against the other model's answer it scored lower (rejected, score 0).

Limits (Vertex AI, "About supervised fine-tuning" and "About preference tuning" for
Gemini 2.5 models): a training file of at most 1 GB of JSONL and 1M text examples; at
most 131,072 input and output tokens an example; a validation set of at most 5,000
examples; adapter sizes 1, 2, 4, 8, 16 (Gemini 2.5 Pro: up to 8). There is no tokenizer
offline (`google.genai.local_tokenizer` downloads one), so tokens are estimated at
Google's rule of about four characters a token.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
from typing import Iterable, Optional

from codeclm_beam.model.errors import ConfigurationError

SUPERVISED, PREFERENCE = "supervised", "preference"
METHODS = {SUPERVISED: "SUPERVISED_FINE_TUNING", PREFERENCE: "PREFERENCE_TUNING"}

MAX_FILE_BYTES = 1_000_000_000
MAX_TRAINING_EXAMPLES = 1_000_000
MAX_EXAMPLE_TOKENS = 131_072
MAX_VALIDATION_EXAMPLES = 5_000
# Google recommends starting with at least 100 examples; fewer is allowed, and warned.
RECOMMENDED_MIN_EXAMPLES = 100
CHARS_PER_TOKEN = 4
ADAPTER_SIZES = {"gemini-2.5-pro": (1, 2, 4, 8)}
DEFAULT_ADAPTER_SIZES = (1, 2, 4, 8, 16)
ADAPTER_SIZE_NAMES = {1: "ADAPTER_SIZE_ONE", 2: "ADAPTER_SIZE_TWO", 4: "ADAPTER_SIZE_FOUR",
                      8: "ADAPTER_SIZE_EIGHT", 16: "ADAPTER_SIZE_SIXTEEN"}


def _turn(role: str, text: str) -> dict:
    return {"role": role, "parts": [{"text": text}]}


def supervised_row(instruction: str, response: str) -> dict:
    """One line of Vertex AI's Gemini supervised-tuning JSONL."""
    return {"contents": [_turn("user", instruction), _turn("model", response)]}


def preference_row(instruction: str, chosen: str, rejected: str) -> dict:
    """One line of Vertex AI's Gemini preference-tuning JSONL: contents ending with the
    user's turn, and two completions scored 1 (preferred) and 0."""
    return {"contents": [_turn("user", instruction)],
            "completions": [{"score": 1, "completion": _turn("model", chosen)},
                            {"score": 0, "completion": _turn("model", rejected)}]}


def _texts(row: dict) -> list[str]:
    texts = [part["text"] for turn in row.get("contents", []) for part in turn["parts"]]
    return texts + [part["text"] for c in row.get("completions", [])
                    for part in c["completion"]["parts"]]


def estimated_tokens(row: dict) -> int:
    """An example's input and output tokens, estimated from its characters."""
    return math.ceil(sum(len(t) for t in _texts(row)) / CHARS_PER_TOKEN)


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """What the tuning job is asked to do; None leaves a value to the service."""
    method: str = SUPERVISED
    epochs: Optional[int] = None
    learning_rate_multiplier: Optional[float] = None
    adapter_size: Optional[int] = None

    def check(self, base_model: str) -> None:
        if self.method not in METHODS:
            raise ConfigurationError(f"--method {self.method!r}: one of "
                                     f"{', '.join(METHODS)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigurationError("--epochs must be at least 1")
        if self.learning_rate_multiplier is not None and self.learning_rate_multiplier <= 0:
            raise ConfigurationError("--learning_rate_multiplier must be positive")
        sizes = next((s for prefix, s in ADAPTER_SIZES.items()
                      if base_model.startswith(prefix)), DEFAULT_ADAPTER_SIZES)
        if self.adapter_size is not None and self.adapter_size not in sizes:
            raise ConfigurationError(
                f"--adapter_size {self.adapter_size}: {base_model} takes "
                f"{', '.join(map(str, sizes))}")


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The JSONL of a tuning job's training and validation files, and what was left
    out of them and why (every kept pair is counted in one of the three)."""
    training: list[dict]
    validation: list[dict]
    skipped: dict[str, int]

    def text(self, part: str) -> str:
        """The JSONL of "training" or "validation"."""
        return self._texts[part]

    @functools.cached_property
    def _texts(self) -> dict[str, str]:
        # Serialised once: the fingerprint, the size check and the upload read it
        # (a training file may be up to 1 GB).
        return {part: "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                              for r in rows)
                for part, rows in (("training", self.training),
                                   ("validation", self.validation))}

    @functools.cached_property
    def fingerprint(self) -> str:
        """What the data is: a hash of both files' bytes."""
        digest = hashlib.sha256()
        for part in ("training", "validation"):
            digest.update(self.text(part).encode("utf-8") + b"\0")
        return digest.hexdigest()

    @property
    def estimated_tokens(self) -> int:
        """Training tokens of one epoch (the validation set is not billed)."""
        return sum(estimated_tokens(r) for r in self.training)

    def problems(self) -> list[str]:
        """Each documented limit the data breaks, said as the fix; [] when none."""
        found = []
        if not self.training:
            found.append("no training example: the run kept no pair this method can use"
                         + (f" ({self._skipped_text()})" if self.skipped else ""))
        if len(self.training) > MAX_TRAINING_EXAMPLES:
            found.append(f"{len(self.training):,} training examples, over Vertex AI's "
                         f"{MAX_TRAINING_EXAMPLES:,}")
        if len(self.validation) > MAX_VALIDATION_EXAMPLES:
            found.append(f"{len(self.validation):,} validation examples, over "
                         f"{MAX_VALIDATION_EXAMPLES:,}: lower --validation_share")
        size = len(self.text("training").encode("utf-8"))
        if size > MAX_FILE_BYTES:
            found.append(f"a training file of {size:,} bytes, over 1 GB")
        empty = sum(1 for r in self.training + self.validation
                    if not all(str(t).strip() for t in _texts(r)))
        if empty:
            found.append(f"{empty} example(s) with an empty instruction or answer "
                         "(Vertex AI refuses a part without text)")
        too_long = [i for i, r in enumerate(self.training + self.validation)
                    if estimated_tokens(r) > MAX_EXAMPLE_TOKENS]
        if too_long:
            found.append(f"{len(too_long)} example(s) over {MAX_EXAMPLE_TOKENS:,} tokens "
                         f"(estimated; the first is number {too_long[0] + 1})")
        return found

    def _skipped_text(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))


def validation_bucket(instruction: str) -> float:
    """Where an instruction falls in [0, 1): the same pairs go to validation on every
    run of the same data."""
    digest = hashlib.sha256(" ".join(instruction.split()).casefold().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def training_data(examples: Iterable[dict], method: str, validation_share: float = 0.0,
                  min_gap: float = 0.0) -> TrainingData:
    """Rows for `method` from a run's kept pairs (as `examples/` holds them). For
    preference, only pairs with the other model's answer and a judged gap of at least
    `min_gap` (and above 0: an even pair prefers neither); the rest are counted."""
    rows, skipped = [], collections.Counter()
    for example in sorted(examples, key=lambda e: e["example_id"]):
        if method == SUPERVISED:
            rows.append((example["instruction"],
                         supervised_row(example["instruction"], example["response"])))
            continue
        other, gap = example.get("other_response"), abs(float(example.get("gap") or 0))
        if not other:
            skipped["without the other model's answer"] += 1
        elif gap <= 0 or gap < min_gap:
            skipped[f"with a judged gap under --min_gap {min_gap:g} or none"] += 1
        else:
            rows.append((example["instruction"],
                         preference_row(example["instruction"], example["response"], other)))
    validation = [row for text, row in rows if validation_bucket(text) < validation_share]
    training = [row for text, row in rows if validation_bucket(text) >= validation_share]
    return TrainingData(training, validation, dict(skipped))
