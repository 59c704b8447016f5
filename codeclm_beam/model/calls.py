"""`ModelCall`: a stage's requests answered, from the response cache or a transport.

    online:  (record, request) ─Ask (each element: the cache, else the model; its
                                 answer stored and passed on as it arrives)──> (record,
                                                                     PredictionResult)
    batch:   (record, request) ─LookUpCache─> answered ───────────────────┐
                    └─ not cached ─> Ask: BatchInference ─> StoreInCache ──┴─> (record,
                                                                     PredictionResult)

Online, the cache is read where the element is asked, on the model's pool (`ModelClient
.call`): a gs:// cache's reads run as concurrently as the calls, and the stage is one
chain of fused steps (why not read first, as batch does: docs/performance.md,
"Composite shapes for the local runner"). Either way only answers that pass the stage's
own answer test are taken from the cache, and only fresh usable answers are stored: an
online answer the moment it arrives (a run killed while a batch is in flight repays at
most the answer in hand), a batch job's as the shard that asked them is done. Hits and
misses leave in no set order.
"""
from __future__ import annotations

import queue
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.utils.windowed_value import WindowedValue

from codeclm_beam import metrics
from codeclm_beam.model.asking import AnswerCheck
from codeclm_beam.model.asking import AnswerValidator
from codeclm_beam.model.batch import BatchInference
from codeclm_beam.model.cache import AnswerCache
from codeclm_beam.model.config import BATCH
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.client import ModelClient
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


class _AskAsAnswered(beam.DoFn):
    """Each element asked on the model's pool, and passed on the moment its answer
    arrives, while later elements are still out.

    Not RunInference (`handler.py` is its face for a pipeline that wants one): it
    answers a batch at once, so each element waits for the slowest answer of its batch
    and the next step of a fused stage for the whole batch. Against answers with a long
    tail (median 3 s, one in a hundred over 30 s) every model step of a round then held
    its quota idle for the length of its batch's last answer (docs/performance.md,
    "Long-tailed latency"). Here at most `4 x max_concurrency` elements are out at
    once (what a batch held); a bundle's last answers are passed on at its end, each
    with the window and timestamp its element came with."""

    def __init__(self, config: ModelConfig, stage: str, check: Optional[AnswerCheck]):
        self._config = config
        self._stage = stage
        self._check = check

    def setup(self):
        self._client = ModelClient(self._config, check=self._check)
        self._metrics = StageMetrics(self._stage, self._config.metered_id())
        self._most_out = max(1, self._config.max_concurrency * 4)

    def start_bundle(self):
        # Each answered future lands here (its done-callback puts it), so taking what
        # has arrived costs nothing per element still out.
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()
        self._out: dict = {}  # future -> (record, request, timestamp, window)

    def process(self, keyed, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        record, request = keyed
        metrics.LIVE.flying(self._stage, 1)
        future = self._client.pool.submit(self._client.call, request)
        self._out[future] = (record, request, timestamp, window)
        future.add_done_callback(self._arrived.put)
        if len(self._out) >= self._most_out:
            yield self._passed_on(self._arrived.get())  # wait for one
        while not self._arrived.empty():
            yield self._passed_on(self._arrived.get())

    def finish_bundle(self):
        # One at a time as each arrives: the next step of a fused stage sends its own
        # request for an element while the rest of this step's are still out.
        while self._out:
            yield self._passed_on(self._arrived.get())

    def _passed_on(self, future) -> WindowedValue:
        record, request, timestamp, window = self._out.pop(future)
        result = future.result()
        metrics.LIVE.flying(self._stage, -1)
        self._metrics.record([result])
        return WindowedValue((record, PredictionResult(
            request, result, model_id=self._client.spec.uri)), timestamp, [window])


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
    """(record, ModelRequest) in, (record, PredictionResult) out, one per input: online,
    each passed on as it is answered, or as batch jobs (--vertex_mode batch), with the
    response cache (--cache_dir) read and filled by either."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        super().__init__()
        self._config = config
        self._stage = stage
        self._check = check

    def expand(self, pairs):
        config = self._config
        if config.billing_mode != BATCH:
            return pairs | "Ask" >> beam.ParDo(_AskAsAnswered(
                config, self._stage, self._check))
        if not config.cache_dir:
            return pairs | "Ask" >> self._batch_jobs(pairs)
        looked_up = pairs | "LookUpCache" >> beam.ParDo(_LookUpCache(
            config, self._stage, self._check)).with_outputs(_TO_ASK, main="answered")
        asked = (looked_up[_TO_ASK] | "Ask" >> self._batch_jobs(pairs)
                 | "StoreInCache" >> beam.ParDo(_StoreInCache(config)))
        return (looked_up.answered, asked) | "Answers" >> beam.Flatten()

    def _batch_jobs(self, pairs) -> BatchInference:
        return BatchInference(self._config, self._stage, self._check, sized_by=pairs)
