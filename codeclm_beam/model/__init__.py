"""The model layer: one request type, one response type, many backends."""
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.handler import CodecLMModelHandler
from codeclm_beam.model.client import ModelClient
from codeclm_beam.model.ratelimit import QuotaConfig
from codeclm_beam.model.ratelimit import MinuteQuota
from codeclm_beam.model.ratelimit import TokenBucketRateLimiter
from codeclm_beam.model.types import CallStats
from codeclm_beam.model.types import ChatMessage
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.model.types import Usage
from codeclm_beam.model.uri import DEFAULT_MODEL_URI
from codeclm_beam.model.uri import ModelSpec

__all__ = [
    "CallStats", "ChatMessage", "CodecLMModelHandler", "DEFAULT_MODEL_URI",
    "GenerationSettings", "ModelClient", "ModelConfig", "ModelFailure", "ModelRequest",
    "ModelResponse", "ModelSpec", "QuotaConfig", "MinuteQuota", "TokenBucketRateLimiter", "Usage",
]
