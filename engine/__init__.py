"""Our inference engine: model forward, KV pool, radix prefix cache, scheduler, sampler."""

from .config import EngineConfig
from .engine import Engine
from .request import FinishReason, RequestOutput
from .sampling_params import InvalidParamError, SamplingParams

__all__ = ["Engine", "EngineConfig", "FinishReason", "InvalidParamError", "RequestOutput", "SamplingParams"]
