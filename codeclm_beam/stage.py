"""A model stage, and `CallModel`, the one composite every model stage runs through.

A stage is three small things (`StageSpec`): how to build its prompt from a record, the
schema of the answer, and how to turn the answer into the next records. Transport,
batching, retries, quotas and caching are the model layer's. `CallModel` joins them:

    records ──Prompt──> (record, request) ──RunInference──> (record, result) ──Parse──> output
       └── bad record ─────────────┐      └── ModelFailure ──┐   └── bad answer ──┐
                                   └──────────────────────────┴────────────────────┴─> dead_letter

Every record that enters leaves as output or as a dead letter with the reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import RunInference

from codeclm_beam import metrics
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.handler import CodecLMModelHandler
from codeclm_beam.model.thinking import LEAST
from codeclm_beam.model.thinking import Thinking
from codeclm_beam.model.types import ChatMessage
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.records import DeadLetter
from codeclm_beam.records import writable

DEAD_LETTER = "dead_letter"


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What a model stage is, apart from how models are called."""

    name: str
    # record -> chat messages
    prompt: Callable[[Any], list[ChatMessage]]
    # record, validated answer (JSON data, or text when schema is None) -> next records
    parse: Callable[[Any, Any], Iterable[Any]]
    # record -> stable id (dead letters, sampling seeds)
    record_id: Callable[[Any], str]
    # The answer's JSON schema; a callable when it depends on the record (a count).
    # None asks for free text.
    schema: Union[None, dict, Callable[[Any], dict]] = None
    # Generation settings; a callable when the output length depends on the record.
    settings: Union[GenerationSettings, Callable[[Any], GenerationSettings]] = (
        GenerationSettings())
    # How much the model thinks when its role's setting is unset: `thinking.LEAST`
    # for structured answers and judgements (a longer think buys little there and
    # is billed as output), `thinking.DEFAULT` (the model's own) for free answers.
    thinking: str = LEAST

    def schema_for(self, record) -> Optional[dict]:
        return self.schema(record) if callable(self.schema) else self.schema

    def settings_for(self, record) -> GenerationSettings:
        return self.settings(record) if callable(self.settings) else self.settings


class StageOutput(NamedTuple):
    output: beam.PCollection
    dead_letter: beam.PCollection


def derive_seed(run_seed: int, *parts: str) -> int:
    """A sampling seed from the run's --seed and the element's identity: the same run
    sends byte-identical requests, so the response cache answers a re-run."""
    digest = hashlib.sha256("\x1f".join([str(run_seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class _BuildRequest(beam.DoFn):
    def __init__(self, spec: StageSpec, run_seed: int, thinking: Thinking):
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
    def __init__(self, spec: StageSpec):
        self._spec = spec

    def process(self, keyed_result):
        record, prediction = keyed_result
        result = prediction.inference
        spec = self._spec
        if isinstance(result, ModelFailure):
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                stage=spec.name, element_id=result.request_id,
                error_class=result.error_class, message=writable(result.message),
                attempts=result.attempts, raw_answer=writable(result.raw_answer),
                payload=DeadLetter.payload_json(record), reason=result.reason,
                finish_reason=result.finish_reason))
            return
        assert isinstance(result, ModelResponse)
        answer = result.data if prediction.example.json_schema_text else result.text
        try:
            outputs = list(spec.parse(record, answer))
        except Exception as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                spec.name, prediction.example.request_id, e, payload=record,
                attempts=result.stats.attempts, raw_answer=result.text))
            return
        yield from outputs


def _safe_id(spec: StageSpec, record) -> str:
    try:
        return spec.record_id(record)
    except Exception:
        return "?"


class CallModel(beam.PTransform):
    """Runs one model stage over a PCollection of records."""

    def __init__(self, spec: StageSpec, model: ModelConfig, run_seed: int = 0):
        super().__init__(label=None)
        self._spec = spec
        self._model = model
        self._run_seed = run_seed
        # Resolved now, so a setting the model cannot take fails before any call.
        self._thinking = model.thinking_for(spec.thinking)

    def expand(self, records) -> StageOutput:
        handler = KeyedModelHandler(CodecLMModelHandler(self._model, self._spec.name))
        prompted = records | "Prompt" >> beam.ParDo(
            _BuildRequest(self._spec, self._run_seed, self._thinking)).with_outputs(
                DEAD_LETTER, main="main")
        parsed = (prompted.main
                  | "Call" >> RunInference(handler)
                  | "Parse" >> beam.ParDo(_ParseAnswer(self._spec)).with_outputs(
                      DEAD_LETTER, main="main"))
        dead = ((prompted[DEAD_LETTER], parsed[DEAD_LETTER])
                | "DeadLetters" >> beam.Flatten())
        return StageOutput(parsed.main, dead)


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
