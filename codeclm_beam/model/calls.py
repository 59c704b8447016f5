"""`ModelCall`: a stage's requests answered, from the response cache or a transport.

    (record, request) ─LookUpCache─> answered ───────────────────────────┐
            └─ not cached ─> Ask: RunInference (stores each answer) ───────┤
                             or BatchInference ─> StoreInCache ────────────┴─> (record,
                                                                     PredictionResult)

The cache is decided here once for both transports, as `RequestResponseIO` puts its
cache around its `Caller`: read before either, with the same `AnswerCache`, and
filled by each as its answers become final. An online answer is stored the moment it
arrives, inside the transport (a run killed while a RunInference batch is in flight
then repays at most the answer in hand, not the batch); a batch job's answers are
stored as the shard that asked them is done. A hit passes the stage's own answer test
first; only fresh usable answers are stored. Hits and misses leave in no set order.
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RunInference

from codeclm_beam.model.asking import AnswerCheck
from codeclm_beam.model.asking import AnswerValidator
from codeclm_beam.model.batch import BatchInference
from codeclm_beam.model.cache import AnswerCache
from codeclm_beam.model.config import BATCH
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.handler import CodecLMModelHandler
from codeclm_beam.model.meter import StageMetrics

_TO_ASK = "to_ask"


class _LookUpCache(beam.DoFn):
    """Answers from the response cache go straight out (counted as the stage's
    elements and cache hits); the rest are to ask."""

    def __init__(self, config: ModelConfig, stage: str, check: Optional[AnswerCheck]):
        self._config = config
        self._stage = stage
        self._check = check

    def setup(self):
        config = self._config
        self._cache = AnswerCache(config.cache_dir, config.identity,
                                  AnswerValidator(self._check))
        self._metrics = StageMetrics(self._stage, config.metered_id())

    def process(self, keyed):
        record, request = keyed
        hit = self._cache.lookup(request)
        if hit is None:
            yield beam.pvalue.TaggedOutput(_TO_ASK, keyed)
            return
        self._metrics.record([hit])
        yield record, PredictionResult(example=request, inference=hit,
                                       model_id=self._config.uri)


class _StoreInCache(beam.DoFn):
    def __init__(self, config: ModelConfig):
        self._config = config

    def setup(self):
        config = self._config
        # Stored answers were validated when they were taken: no check needed here.
        self._cache = AnswerCache(config.cache_dir, config.identity, AnswerValidator())

    def process(self, keyed):
        _, prediction = keyed
        self._cache.store(prediction.example, prediction.inference)
        yield keyed


class ModelCall(beam.PTransform):
    """(record, ModelRequest) in, (record, PredictionResult) out, one per input: online
    through RunInference, or as batch jobs (--vertex_mode batch), with the response
    cache (--cache_dir) around either."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        super().__init__()
        self._config = config
        self._stage = stage
        self._check = check

    def expand(self, pairs):
        if not self._config.cache_dir:
            return pairs | "Ask" >> self._transport(pairs)
        looked_up = pairs | "LookUpCache" >> beam.ParDo(_LookUpCache(
            self._config, self._stage, self._check)).with_outputs(_TO_ASK, main="answered")
        asked = looked_up[_TO_ASK] | "Ask" >> self._transport(pairs)
        if self._config.billing_mode == BATCH:
            asked = asked | "StoreInCache" >> beam.ParDo(_StoreInCache(self._config))
        return (looked_up.answered, asked) | "Answers" >> beam.Flatten()

    def _transport(self, pairs) -> beam.PTransform:
        if self._config.billing_mode == BATCH:
            return BatchInference(self._config, self._stage, self._check, sized_by=pairs)
        return RunInference(KeyedModelHandler(CodecLMModelHandler(
            self._config, self._stage, self._check, through_cache=False)))
