"""A model stage, and `CallModel`, the one composite every model stage runs through.

A stage is three small things (a `Stage`): how to build its prompt from a record, the
typed answer (whose JSON schema the model is asked for), and how to turn the answer
into the next records. Transport,
batching, retries, quotas and caching are the model layer's. `CallModel` joins them:

    records ──Prompt──> (record, request) ──Call──> (record, result) ──Parse──> output
       └── bad record ─────────────┐      └── ModelFailure ──┐   └── bad answer ──┐
                                   └──────────────────────────┴────────────────────┴─> errors

Call is the model layer's `ModelCall`: online, each element answered from the response
cache or the model and passed on as its answer arrives; or batch jobs for a model in
--vertex_mode batch.
Every record that enters leaves as output or as a dead letter with the reason. Dead
letters go to Beam's `ErrorHandler` (`with_error_handler`, as Beam's own IOs take one):
one per pipeline, opened by the pipeline that writes them, given to every composite.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, ClassVar, Iterable, Optional

import apache_beam as beam
import pydantic

from codeclm_beam import metrics
from codeclm_beam.model.calls import ModelCall
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.thinking import LEAST
from codeclm_beam.model.thinking import Thinking
from codeclm_beam.model.types import ChatMessage
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.records import DeadLetter

DEAD_LETTER = "dead_letter"


class Answer(pydantic.BaseModel):
    """A stage's typed answer. Its JSON schema is what the model is asked to fill
    (constrained decoding where the backend has it); the handler validates every
    answer against that schema, and the stage's `parse` reads typed fields."""

    model_config = pydantic.ConfigDict(extra="forbid")

    @classmethod
    def request_schema(cls) -> dict:
        """The model's JSON schema as sent: no titles, nested models inlined (not every
        backend follows `$ref`). Made once per answer type and shared: not to be
        changed by the caller."""
        return _request_schema(cls)

    @classmethod
    def variant(cls, **fields) -> type["Answer"]:
        """This answer with some fields' types replaced: for what is known only when
        the stage is built or the record is read (a count, a score scale)."""
        return pydantic.create_model(
            cls.__name__, __base__=cls,
            **{name: (annotation, ...) for name, annotation in fields.items()})


@functools.cache
def _request_schema(answer_type: type[Answer]) -> dict:
    # Every request of a stage asks for the same schema, and pydantic builds one in
    # about a fifth of a millisecond: as much as the rest of building the request.
    # Answer types are few and made once (the stages' functools.cache'd variants).
    schema = answer_type.model_json_schema()
    return _inline(schema, schema.pop("$defs", {}))


def _inline(node, definitions: dict):
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _inline(dict(definitions[node["$ref"].rsplit("/", 1)[1]]), definitions)
    return {key: (_inline(value, definitions) if key != "properties" else
                  {name: _inline(prop, definitions) for name, prop in value.items()})
            for key, value in node.items() if key != "title"}


@dataclasses.dataclass(frozen=True)
class YamlFace:
    """How a one-model stage shows in Beam YAML (`transforms/beam_yaml.py` derives its
    factory from this and the stage's fields): the transform's name, the composite it
    builds (dotted), the records it reads and writes, and the composite's own
    arguments before the stage."""
    name: str
    transform: str
    input_record: type
    output_record: type
    doc: str
    leading: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a model stage is, apart from how models are called (after curator's
    `LLM.prompt()`/`parse()` with a `response_format`, and distilabel's
    `Task.format_input`/`format_output`). A stage module subclasses it once; the
    fields are the stage's parameters, so a stage can be built, its prompt rendered and
    its parsing tested without a pipeline or a model."""

    name: str = "stage"
    settings: GenerationSettings = GenerationSettings()

    # How much the model thinks when its role's setting is unset: `thinking.LEAST`
    # for structured answers and judgements (a longer think buys little there and
    # is billed as output), `thinking.DEFAULT` (the model's own) for free answers.
    thinking: ClassVar[str] = LEAST

    # Set by a stage offered in Beam YAML as a transform of its own.
    yaml: ClassVar[Optional[YamlFace]] = None

    # Every stage class, by module and name: `codeclm-beam prompts` renders them all.
    _registered: ClassVar[list[type["Stage"]]] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Stage._registered.append(cls)

    @classmethod
    def registered(cls) -> list[type["Stage"]]:
        return list(Stage._registered)

    @classmethod
    def samples(cls) -> dict[str, tuple["Stage", Any]]:
        """Prompt name -> (this stage as the method runs it, a sample record): what
        `codeclm-beam prompts` shows (distilabel's `_Task._sample_input`)."""
        return {}

    def record_id(self, record) -> str:
        """A stable id: dead letters name it, and sampling seeds derive from it."""
        raise NotImplementedError

    def prompt(self, record) -> list[ChatMessage]:
        raise NotImplementedError

    def answer_type(self, record) -> Optional[type[Answer]]:
        """The answer's type; None asks for free text."""
        return None

    def parse(self, record, answer) -> Iterable[Any]:
        """The next records from a record and its answer (an `answer_type` instance,
        or the text)."""
        raise NotImplementedError

    def answer_problem(self, answer) -> Optional[str]:
        """Why an answer (its JSON data, or the text) cannot make a record whatever
        the record, or None. The model layer asks again (another seed, up to
        --max_parse_retries) rather than cache or pass on such an answer, and applies
        the same test to cache hits."""
        return None

    def settings_for(self, record) -> GenerationSettings:
        return self.settings

    def schema_for(self, record) -> Optional[dict]:
        answer_type = self.answer_type(record)
        return answer_type.request_schema() if answer_type else None

    def read_answer(self, record, response: ModelResponse):
        answer_type = self.answer_type(record)
        return (answer_type.model_validate(response.data) if answer_type
                else response.text)


class DeadLettering(beam.PTransform):
    """A composite whose bad elements leave as `DeadLetter`s through a Beam
    `ErrorHandler` (`with_error_handler`), and that hands the same handler to the
    composites it applies. Without a handler the first dead letter fails the
    pipeline, with its reason, as Beam's transforms do without error handling:
    nothing is dropped silently."""

    _error_handler = None

    def with_error_handler(self, error_handler):
        self._error_handler = error_handler
        return self

    def handled(self, transform: "DeadLettering") -> "DeadLettering":
        """`transform`, with this composite's error handler."""
        return transform.with_error_handler(self._error_handler)

    def dead_letters(self, *dead: beam.PCollection) -> None:
        if self._error_handler is not None:
            # Each to the handler as it is, not flattened here first (shape:
            # docs/performance.md, "Composite shapes for the local runner").
            for pcoll in dead:
                self._error_handler.add_error_pcollection(pcoll)
        else:
            (dead | "DeadLetters" >> beam.Flatten()
             | "FailOnDeadLetter" >> beam.Map(_fail_on))


def _fail_on(dead_letter: DeadLetter) -> None:
    raise RuntimeError(
        f"{dead_letter.stage}: element {dead_letter.element_id} failed "
        f"({dead_letter.reason}: {dead_letter.message[:500]}); give the transform an "
        "ErrorHandler (with_error_handler) to keep such elements as dead letters")


def derive_seed(run_seed: int, *parts: str) -> int:
    """A sampling seed from the run's --seed and the element's identity: the same run
    sends byte-identical requests, so the response cache answers a re-run."""
    digest = hashlib.sha256("\x1f".join([str(run_seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class _BuildRequest(beam.DoFn):
    def __init__(self, spec: Stage, run_seed: int, thinking: Thinking):
        self._spec = spec
        self._run_seed = run_seed
        self._thinking = thinking

    def process(self, record):
        spec = self._spec
        try:
            record_id = spec.record_id(record)
            messages = spec.prompt(record)
            settings = dataclasses.replace(
                spec.settings_for(record), thinking=self._thinking,
                seed=derive_seed(self._run_seed, spec.name, record_id))
            request = ModelRequest.create(record_id, messages, settings,
                                           spec.schema_for(record))
        except Exception as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                spec.name, _safe_id(spec, record), e, payload=record))
            return
        yield record, request


class _ParseAnswer(beam.DoFn):
    def __init__(self, spec: Stage):
        self._spec = spec

    def process(self, keyed_result):
        record, prediction = keyed_result
        result = prediction.inference
        spec = self._spec
        if isinstance(result, ModelFailure):
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of_failure(
                spec.name, result, payload=record))
            return
        assert isinstance(result, ModelResponse)
        try:
            outputs = list(spec.parse(record, spec.read_answer(record, result)))
        except Exception as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                spec.name, prediction.example.request_id, e, payload=record,
                attempts=result.stats.attempts, raw_answer=result.text))
            return
        yield from outputs


def _safe_id(spec: Stage, record) -> str:
    try:
        return spec.record_id(record)
    except Exception:
        return "?"


class CallModel(DeadLettering):
    """Runs one model stage over a PCollection of records: its outputs."""

    def __init__(self, spec: Stage, model: ModelConfig, run_seed: int = 0):
        super().__init__(label=None)
        self._spec = spec
        self._model = model
        self._run_seed = run_seed
        # Resolved now, so a setting the model cannot take fails before any call.
        self._thinking = model.thinking_for(spec.thinking)

    def expand(self, records) -> beam.PCollection:
        # Output types given, as inference would find them, so that Beam does not
        # walk these DoFns' bytecode for them in every model stage (a fifth of the
        # graph's type inference, about 10 ms a stage).
        prompted = records | "Prompt" >> beam.ParDo(
            _BuildRequest(self._spec, self._run_seed, self._thinking)
        ).with_output_types(tuple[Any, Any]).with_outputs(DEAD_LETTER, main="main")
        parsed = (prompted.main
                  | "Call" >> ModelCall(self._model, self._spec.name,
                                        self._spec.answer_problem)
                  | "Parse" >> beam.ParDo(_ParseAnswer(self._spec)).with_output_types(
                      Any).with_outputs(DEAD_LETTER, main="main"))
        self.dead_letters(prompted[DEAD_LETTER], parsed[DEAD_LETTER])
        return parsed.main


class _Tally(beam.DoFn):
    def __init__(self, name: str):
        self._name = name
        self._counter = None

    def setup(self):
        self._counter = metrics.flow_counter(self._name)

    def process(self, element):
        self._counter.inc()
        yield element


class Tally(beam.PTransform):
    """Passes elements through, counting them as the flow counter `name` (declared in
    `codeclm_beam.metrics`); the manifest's accounting is read from these counters."""

    def __init__(self, name: str):
        super().__init__(label=f"Tally[{name}]")
        self._name = name

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_Tally(self._name))


def parts(pcolls) -> tuple:
    """What a composite that also takes several PCollections (as Flatten does) was
    given, as a tuple: left unflattened, each part can be worked on in the stage that
    makes it (why: docs/performance.md, "Composite shapes for the local runner")."""
    return pcolls if isinstance(pcolls, tuple) else (pcolls,)
