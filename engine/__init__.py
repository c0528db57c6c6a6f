"""Our inference engine: model forward, KV pool, radix prefix cache, scheduler, sampler.

The names below load on first use, so that `sglang_gw.engine.settings` (and anything else that
imports no torch) can be used by the gateway and the supervisor without loading torch.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": ".engine",
    "EngineConfig": ".settings",
    "FinishReason": ".request",
    "InvalidParamError": ".sampling_params",
    "RequestOutput": ".request",
    "SamplingParams": ".sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
