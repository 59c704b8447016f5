"""A `RemoteModelHandler` for `RunInference`: the model layer for a pipeline that
calls a model through Beam's RunInference. (The stages' own online calls pass each
answer on as it arrives instead: `calls.ModelCall`.)

RunInference owns batching, per-process client sharing and its own metrics, as for any
Beam model; `client.ModelClient` owns the call (quota, retries, re-asks). `request()`
never raises. RemoteModelHandler's own retry and failure path work per *batch* (one
bad element would re-send or dead-letter 31 good ones), so every element comes back as
a `PredictionResult` whose inference is a response or a `ModelFailure`, and the
calling transform routes failures to its dead letters.

Elements of a batch run concurrently on a thread pool shared by every stage that calls
the same model in this process, so `max_concurrency` bounds requests in flight per
worker process and a batch of 32 costs about one round-trip, not 32.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RemoteModelHandler

from codeclm_beam import metrics
from codeclm_beam.model.asking import AnswerCheck
from codeclm_beam.model.client import ModelClient
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.meter import StageMetrics
from codeclm_beam.model.types import ModelRequest


class CodecLMModelHandler(RemoteModelHandler[ModelRequest, PredictionResult, ModelClient]):
    """One model, as called by one stage. Use it with `RunInference`, usually keyed:
    `RunInference(KeyedModelHandler(CodecLMModelHandler(config, "encode")))`."""

    def __init__(self, config: ModelConfig, stage: str,
                 check: Optional[AnswerCheck] = None):
        # Batch-level retries and throttling stay off: the client retries per element
        # and never raises, and quota waits are signalled by StageMetrics.
        super().__init__(namespace=metrics.PREFIX + stage, num_retries=0)
        self._config = config
        self._stage = stage
        self._check = check
        # A batch is what runs concurrently; a few rounds of the pool per batch keep
        # it busy without holding many elements in memory. Batches start at the
        # pool's width: BatchElements otherwise starts at one element and grows with
        # its measured batch time, so against a slow server it spent most of a stage
        # at 2 elements in flight (1.65-2.3 on average, measured). A bundle's last
        # batch is flushed whatever its size, so a small stage never waits for more.
        self._batching_kwargs = {
            "min_batch_size": max(1, config.max_concurrency),
            "max_batch_size": max(1, config.max_concurrency * 4)}
        self._metrics: Optional[StageMetrics] = None

    @property
    def config(self) -> ModelConfig:
        return self._config

    def create_client(self) -> ModelClient:
        return ModelClient(self._config, check=self._check)

    def request(self, batch: Sequence[ModelRequest], model: ModelClient,
                inference_args: Optional[dict[str, Any]] = None) -> list[PredictionResult]:
        metrics.LIVE.flying(self._stage, len(batch))
        try:
            results = model.call_all(batch)
        finally:
            metrics.LIVE.flying(self._stage, -len(batch))
        if self._metrics is None:
            self._metrics = StageMetrics(self._stage, self._config.metered_id())
        self._metrics.record(results)
        return [PredictionResult(example=req, inference=res, model_id=model.spec.uri)
                for req, res in zip(batch, results)]

    def get_metrics_namespace(self) -> str:
        return metrics.PREFIX + self._stage

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_metrics"] = None
        return state
