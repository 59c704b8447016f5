"""Typed records that flow between CodecLM stages, with their Avro schemas.

Records are frozen dataclasses: they pickle across Beam workers, compare by value in
tests, and their Avro schemas are derived from the field types, so the schema of a file
cannot drift from the record that wrote it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from typing import Any, Iterable, Optional


def invalid_text_reason(text: str) -> Optional[str]:
    """Why `text` cannot be written as UTF-8 (a lone surrogate, which JSON's "\\ud800"
    escapes let through) or holds a NUL (which C-string tools and trainers cut at), or
    None. One rule for text on both sides: seeds and benchmark rows are refused with
    it, model answers asked again and then dead letters."""
    nul = text.find("\x00")
    if nul != -1:
        return f"not valid text: a NUL character (U+0000) at character {nul}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"not valid Unicode text: a lone surrogate (U+{ord(text[e.start]):04X}) "
                f"at character {e.start}")
    return None


def content_id(prefix: str, text: str) -> str:
    """A stable id from content (Python's hash() is salted per process)."""
    return prefix + hashlib.sha256(text.encode("utf-8")).hexdigest()[:15]


@dataclasses.dataclass(frozen=True)
class Seed:
    seed_id: str
    instruction: str
    source: str  # file and row it came from

    @classmethod
    def of(cls, instruction: str, source: str = "") -> "Seed":
        return cls(content_id("s", instruction), instruction, source)


@dataclasses.dataclass(frozen=True)
class Metadata:
    """One use case and 1..max_skills skills: the method's instruction metadata."""

    metadata_id: str
    use_case: str
    skills: tuple[str, ...]
    origin: str  # "seed" (encoded), "user" (supplied), "mix" (mix-and-match)
    seed_id: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RubricSet:
    """The rubric state of one metadata entry: rubrics and the action of each."""

    metadata_id: str
    use_case: str
    skills: tuple[str, ...]
    rubrics: tuple[str, ...]
    actions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An instruction on its way through filter -> improve rounds."""

    candidate_id: str
    instruction: str
    metadata_id: str
    use_case: str
    skills: tuple[str, ...]
    iteration: int = 1
    actions_applied: tuple[str, ...] = ()
    # Earlier versions of the instruction, oldest first: the improvement chain.
    history: tuple[str, ...] = ()
    pending_action: Optional[str] = None
    strong_answer: Optional[str] = None
    target_answer: Optional[str] = None
    strong_score: Optional[float] = None
    target_score: Optional[float] = None
    # The judge's scores as (strong, target) with the strong answer first, then as
    # (strong, target) with the target answer first; the two scores above are means.
    judge_orders: tuple[float, ...] = ()

    @property
    def answer_key(self) -> str:
        """Names this version's answers (and so their sampling seeds)."""
        return f"{self.candidate_id}/i{self.iteration}"

    @property
    def gap(self) -> Optional[float]:
        if self.strong_score is None or self.target_score is None:
            return None
        return self.strong_score - self.target_score

    @classmethod
    def of(cls, instruction: str, use_case: str = "", skills: tuple[str, ...] = (),
           metadata_id: str = "") -> "Candidate":
        """A candidate from your own instruction, for using ContrastiveFilter alone."""
        return cls(content_id("c", instruction), instruction, metadata_id, use_case,
                   tuple(skills))


@dataclasses.dataclass(frozen=True)
class Example:
    """A kept instruction-response pair: the product."""

    example_id: str
    instruction: str
    response: str
    response_source: str  # "strong" | "target"
    iteration: int
    use_case: str
    skills: tuple[str, ...]
    # The chain: history[i] is the instruction at iteration i + 1, and
    # actions_applied[i] the action that rewrote it into the next one.
    actions_applied: tuple[str, ...]
    history: tuple[str, ...]
    metadata_id: str
    strong_score: float
    target_score: float
    gap: float
    strong_model: str
    target_model: str
    judge_model: str
    # The other model's answer, not kept (with `response`, a preference pair).
    other_response: Optional[str] = None
    judge_orders: tuple[float, ...] = ()  # as in Candidate

    @classmethod
    def of(cls, candidate: "Candidate", source: str,
           models: dict[str, str]) -> "Example":
        """`candidate`, scored, kept with the answer of `source` ("strong"/"target")."""
        strong = source == "strong"
        return cls(
            example_id=candidate.candidate_id, instruction=candidate.instruction,
            response=candidate.strong_answer if strong else candidate.target_answer,
            other_response=candidate.target_answer if strong else candidate.strong_answer,
            judge_orders=candidate.judge_orders,
            response_source=source, iteration=candidate.iteration,
            use_case=candidate.use_case, skills=candidate.skills,
            actions_applied=candidate.actions_applied, history=candidate.history,
            metadata_id=candidate.metadata_id, strong_score=candidate.strong_score,
            target_score=candidate.target_score, gap=candidate.gap,
            **{f"{role}_model": uri for role, uri in models.items()})


# Reasons a screen (deduplication, decontamination) removes an element for.
DUPLICATE = "duplicate"
CONTAMINATED = "contaminated"


@dataclasses.dataclass(frozen=True)
class Removal:
    """Why `DeduplicateInstructions` or `Decontaminate` removed an element."""

    element_id: str
    reason: str  # DUPLICATE | CONTAMINATED
    # A duplicate: the id of the element kept in its place (or of the reference it
    # repeats), and the Jaccard similarity of the two (1.0: the same normalised text).
    duplicate_of: Optional[str] = None
    similarity: Optional[float] = None
    # The normalised text it was compared with, as it read then (an improved candidate
    # keeps its id, so the id alone may later name another text).
    matched_text: Optional[str] = None
    # Contaminated: the benchmark row ("file:line"), the shared n-grams, which of the
    # element's texts holds them, and the rule that matched (same_text,
    # shared_N_gram, share_of_3_grams or near; similarity is then the share or the
    # Jaccard similarity, matched_text the row's normalised text).
    benchmark_row: Optional[str] = None
    overlap: Optional[str] = None
    field: Optional[str] = None
    rule: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A candidate that did not become an example, and why."""

    candidate_id: str
    # "within_threshold" after the last round, "not_needed" once --num_examples was in
    # reach, "surplus" beyond it; DUPLICATE or CONTAMINATED before it was judged (or,
    # kept, on the final pairs).
    reason: str
    instruction: str
    iteration: int
    use_case: str
    skills: tuple[str, ...]
    actions_applied: tuple[str, ...]  # the chain, as in Example
    history: tuple[str, ...]
    metadata_id: str
    strong_answer: Optional[str]
    target_answer: Optional[str]
    strong_score: Optional[float]
    target_score: Optional[float]
    gap: Optional[float]
    judge_orders: tuple[float, ...] = ()  # as in Candidate
    # Removed as a duplicate or as contaminated: what it matched (`Removal`).
    duplicate_of: Optional[str] = None
    similarity: Optional[float] = None
    matched_text: Optional[str] = None
    benchmark_row: Optional[str] = None
    overlap: Optional[str] = None
    overlap_field: Optional[str] = None
    contamination_rule: Optional[str] = None

    @classmethod
    def of_removal(cls, record: Any, removal: Removal) -> "Rejection":
        """A Candidate or an Example a screen removed, with what it matched."""
        rejection = (cls.of(record, removal.reason) if isinstance(record, Candidate)
                     else cls.of_example(record, removal.reason))
        return dataclasses.replace(
            rejection, duplicate_of=removal.duplicate_of, similarity=removal.similarity,
            matched_text=removal.matched_text, benchmark_row=removal.benchmark_row, overlap=removal.overlap,
            overlap_field=removal.field, contamination_rule=removal.rule)

    @classmethod
    def of(cls, candidate: "Candidate", reason: str) -> "Rejection":
        return cls(
            candidate_id=candidate.candidate_id, reason=reason,
            instruction=candidate.instruction, iteration=candidate.iteration,
            use_case=candidate.use_case, skills=candidate.skills,
            actions_applied=candidate.actions_applied, history=candidate.history,
            metadata_id=candidate.metadata_id, strong_answer=candidate.strong_answer,
            target_answer=candidate.target_answer, strong_score=candidate.strong_score,
            target_score=candidate.target_score, gap=candidate.gap,
            judge_orders=candidate.judge_orders)

    @classmethod
    def of_example(cls, example: Example, reason: str) -> "Rejection":
        """A kept pair cut away (the surplus beyond --num_examples)."""
        return cls(
            candidate_id=example.example_id, reason=reason,
            instruction=example.instruction, iteration=example.iteration,
            use_case=example.use_case, skills=example.skills,
            actions_applied=example.actions_applied, history=example.history,
            metadata_id=example.metadata_id,
            strong_answer=example.response if example.response_source == "strong"
            else example.other_response,
            target_answer=example.response if example.response_source == "target"
            else example.other_response,
            strong_score=example.strong_score, target_score=example.target_score,
            gap=example.gap, judge_orders=example.judge_orders)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """An element a stage could not process, with the reason. Never silently dropped."""

    stage: str
    element_id: str
    error_class: str
    message: str
    attempts: int = 0
    raw_answer: Optional[str] = None
    payload: Optional[str] = None  # the input record as JSON
    # One word to count and filter by: truncated, schema, transient, refused,
    # bad_input, error (`codeclm_beam.model.errors.failure_reason`).
    reason: str = "error"
    # The model's finish reason, when an answer arrived (MAX_TOKENS, length, ...).
    finish_reason: Optional[str] = None

    @classmethod
    def of(cls, stage: str, element_id: str, error: BaseException, *, payload: Any = None,
           attempts: int = 0, raw_answer: Optional[str] = None,
           reason: Optional[str] = None) -> "DeadLetter":
        from codeclm_beam.model.errors import failure_reason
        from codeclm_beam.redact import excerpt
        return cls(stage=stage, element_id=writable(element_id),
                   error_class=type(error).__name__,
                   message=writable(excerpt(str(error))), attempts=attempts,
                   raw_answer=writable(excerpt(raw_answer)) if raw_answer else None,
                   payload=cls.payload_json(payload),
                   reason=reason or failure_reason(error))

    @classmethod
    def of_failure(cls, stage: str, failure: Any, *, payload: Any = None
                   ) -> "DeadLetter":
        """A model call's `ModelFailure` (already redacted and cut where it was made)."""
        return cls(stage=stage, element_id=failure.request_id,
                   error_class=failure.error_class, message=writable(failure.message),
                   attempts=failure.attempts, raw_answer=writable(failure.raw_answer),
                   payload=cls.payload_json(payload), reason=failure.reason,
                   finish_reason=failure.finish_reason)

    @staticmethod
    def payload_json(record: Any) -> Optional[str]:
        # ASCII JSON: a payload that is not valid Unicode (the reason it is here) is
        # written as \\u escapes instead of failing the writer.
        if record is None:
            return None
        try:
            value = to_dict(record) if dataclasses.is_dataclass(record) else record
            return json.dumps(value, ensure_ascii=True, default=repr)[:100_000]
        except Exception:
            return ascii(record)[:100_000]


def writable(text: Optional[str]) -> Optional[str]:
    """`text`, with anything UTF-8 cannot hold (lone surrogates) as backslash escapes:
    for dead letters and messages, which must be written whatever they quote."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def to_dict(record: Any) -> dict:
    """A record as a JSON-ready dict (tuples become lists)."""
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value = data[field.name]
        if isinstance(value, list) and _is_tuple(hints[field.name]):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _is_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return origin is tuple


_AVRO_PRIMITIVES = {str: "string", int: "long", float: "double", bool: "boolean"}


def _avro_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return ["null", _avro_type(args[0])]
    if origin is tuple:
        return {"type": "array", "items": _avro_type(typing.get_args(hint)[0])}
    return _AVRO_PRIMITIVES[hint]


def avro_schema(cls: type) -> dict:
    """The Avro record schema of a record dataclass."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        avro_field = {"name": field.name, "type": _avro_type(hints[field.name])}
        if isinstance(avro_field["type"], list):
            avro_field["default"] = None
        fields.append(avro_field)
    return {"type": "record", "name": cls.__name__, "namespace": "codeclm_beam",
            "fields": fields}


# Metadata rules: what makes a use case and skills usable, and a metadata entry's id.
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


# The records `codeclm-beam prompts` renders each stage's prompt on (`Stage.samples`).
SAMPLE_SEED = Seed.of("Write a SQL query that lists the ten customers who spent the "
                      "most last month, with their total.")
SAMPLE_METADATA = Metadata("m-sample", "code generation", ("sql", "data analysis"), "seed")
SAMPLE_CANDIDATE = Candidate.of(
    "Write a SQL query that finds customers whose spending dropped by half from one "
    "month to the next.", SAMPLE_METADATA.use_case, SAMPLE_METADATA.skills)
SAMPLE_ANSWERED = dataclasses.replace(
    SAMPLE_CANDIDATE,
    pending_action="Require the query to handle customers with no orders in a month",
    strong_answer="SELECT ... (the strong model's answer)",
    target_answer="SELECT ... (the target model's answer)")

