"""The engine on a CUDA device (skipped without one): the `triton` backend's compiled kernels, CUDA graph
replay against eager steps, and the scheduler's retraction and abort paths on the GPU. The kernels' own
checks against the reference are in test_triton_attention.py (compiled there too when CUDA is present)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from sglang_gw.engine import Engine, SamplingParams  # noqa: E402
from sglang_gw.engine.cuda_graphs import GraphedModel, capture_sizes  # noqa: E402

CUDA = dict(device="cuda", dtype="float32", max_total_tokens=16384)  # float32: tokens comparable exactly


def _prompts(n: int, seed: int, lo: int = 4, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _greedy(n: int, longest: int) -> list[SamplingParams]:
    """Different lengths, so that the decode batch shrinks through many sizes as requests finish."""
    return [SamplingParams(max_new_tokens=longest - i % longest, temperature=0, ignore_eos=True) for i in range(n)]


def test_auto_is_triton_and_bfloat16_on_cuda(tiny_models):
    with Engine(model=str(tiny_models["llama"]), device="cuda", max_total_tokens=1024, cuda_graph_max_bs=8) as engine:
        assert engine.resolved_settings["attention_backend"] == "triton"
        assert engine.resolved_settings["dtype"] == "bfloat16"
        assert engine.resolved_settings["cuda_graph_max_bs"] == 8
        out = engine.generate(_prompts(1, seed=1)[0], SamplingParams(max_new_tokens=4, temperature=0))[0]
        assert len(out.output_ids) == 4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_graph_replay_gives_the_same_tokens_as_eager_and_as_the_reference(tiny_models, family, monkeypatch):
    """20 requests with graphs up to 16: the first steps run eagerly (20 > 16), then replay at 16, padded
    sizes (13 → 16, 5 → 8, 3 → 4) and exact ones, while the batch shrinks."""
    replayed = []
    forward = GraphedModel.forward

    def recording(self, batch, attn):
        if self.covers(batch):
            replayed.append(batch.num_tokens)
        return forward(self, batch, attn)

    monkeypatch.setattr(GraphedModel, "forward", recording)
    prompts, params = _prompts(20, seed=2), _greedy(20, longest=24)
    outputs = {}
    for name, settings in {"graphs": dict(attention_backend="triton", cuda_graph_max_bs=16),
                           "eager": dict(attention_backend="triton", cuda_graph_max_bs=0),
                           "torch": dict(attention_backend="torch", cuda_graph_max_bs=0)}.items():
        with Engine(model=str(tiny_models[family]), **CUDA, **settings) as engine:
            outputs[name] = [o.output_ids for o in engine.generate(prompts, params)]
            engine.check_integrity()
    assert outputs["graphs"] == outputs["eager"] == outputs["torch"]
    assert 16 in replayed and any(n not in capture_sizes(16) for n in replayed)


def test_retraction_under_memory_pressure_matches_an_unpressured_run(tiny_models):
    prompts = _prompts(20, seed=7, lo=8, hi=48)
    params = [SamplingParams(max_new_tokens=40 + 3 * i, temperature=0, ignore_eos=True) for i in range(20)]
    with Engine(model=str(tiny_models["llama"]), **CUDA, cuda_graph_max_bs=32) as big:
        expected = [o.output_ids for o in big.generate(prompts, params)]
    with Engine(model=str(tiny_models["llama"]), device="cuda", dtype="float32", max_total_tokens=360,
                chunked_prefill_size=64, cuda_graph_max_bs=32) as small:
        assert [o.output_ids for o in small.generate(prompts, params)] == expected
        assert small.scheduler.stats.retractions > 0
        small.check_integrity()


def test_abort_during_decode_frees_everything(tiny_models):
    with Engine(model=str(tiny_models["llama"]), **CUDA, cuda_graph_max_bs=8) as engine:
        async def run():
            streams = [engine.generate_stream(p, SamplingParams(max_new_tokens=2000, ignore_eos=True))
                       for p in _prompts(4, seed=5)]
            firsts = [await anext(s) for s in streams]  # every request is decoding
            assert all(not f.finished for f in firsts)
            engine.abort_all()
            return [[out async for out in s][-1] for s in streams]

        lasts = asyncio.run(run())
        assert all(o.finish_reason.type == "abort" for o in lasts)
        engine.check_integrity()
        assert engine.pool.available() + engine.cache.evictable_size() == engine.pool.size
