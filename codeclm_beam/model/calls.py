"""`ModelCall`: a stage's requests answered, from the response cache or a transport.

    online:  (record, request) ─Ask: RunInference (each element: the cache, else the
                                 model; its answer stored as it arrives)──> (record,
                                                                     PredictionResult)
    batch:   (record, request) ─LookUpCache─> answered ───────────────────┐
                    └─ not cached ─> Ask: BatchInference ─> StoreInCache ──┴─> (record,
                                                                     PredictionResult)

Online, the cache is read where the element is asked, on the model's pool (`ModelClient
.call`): a gs:// cache's reads run as concurrently as the calls, and the stage is one
chain of fused steps (why not read first, as batch does: docs/performance.md, "Composite shapes for the local runner"). Either way only answers that pass the stage's
own answer test are taken from the cache, and only fresh usable answers are stored: an
online answer the moment it arrives (a run killed while a batch is in flight repays at
most the answer in hand), a batch job's as the shard that asked them is done. Hits and
misses leave in no set order.
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
    cache (--cache_dir) read and filled by either."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        super().__init__()
        self._config = config
        self._stage = stage
        self._check = check

    def expand(self, pairs):
        config = self._config
        if config.billing_mode != BATCH:
            return pairs | "Ask" >> RunInference(KeyedModelHandler(CodecLMModelHandler(
                config, self._stage, self._check)))
        if not config.cache_dir:
            return pairs | "Ask" >> self._batch_jobs(pairs)
        looked_up = pairs | "LookUpCache" >> beam.ParDo(_LookUpCache(
            config, self._stage, self._check)).with_outputs(_TO_ASK, main="answered")
        asked = (looked_up[_TO_ASK] | "Ask" >> self._batch_jobs(pairs)
                 | "StoreInCache" >> beam.ParDo(_StoreInCache(config)))
        return (looked_up.answered, asked) | "Answers" >> beam.Flatten()

    def _batch_jobs(self, pairs) -> BatchInference:
        return BatchInference(self._config, self._stage, self._check, sized_by=pairs)
