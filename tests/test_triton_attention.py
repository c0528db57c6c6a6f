"""The `triton` attention backend against the torch reference: its kernels on small shapes (prefill over
cached prefixes of every length, chunked; decode at varied lengths, GQA ratios and splits), and greedy
generation through a real engine, its decode steps partly through the CUDA graphs' dispatch and padding
(replayed eagerly, so without CUDA). Without CUDA the kernels run in Triton's interpreter; with CUDA they are
compiled for the GPU. Skipped where triton cannot be imported."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton decides interpreted or compiled when a function is decorated (triton.language's own at its import,
# our kernels' at triton_kernels' import), and the interpreter reads the variable again while it runs: set
# for those imports, then only while this module's tests run (`_interpreting`), not for the test session.
INTERPRET = DEVICE == "cpu" and "triton" not in sys.modules
_before = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from sglang_gw.engine import Engine, SamplingParams, triton_kernels  # noqa: E402
from sglang_gw.engine.cuda_graphs import GraphedModel, capture_sizes  # noqa: E402

if INTERPRET and _before is None:
    del os.environ["TRITON_INTERPRET"]

# Without CUDA the kernels need the interpreter, which this process has only if triton was first imported
# here; where another test module imported it before (sglang's frontend does), a fresh process runs them.
RUNS_HERE = DEVICE == "cuda" or isinstance(tl.sum, InterpretedFunction)
here = pytest.mark.skipif(not RUNS_HERE, reason="triton was imported compiled in this process: run in a fresh one")


@pytest.fixture(autouse=True)
def _interpreting(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # bf16: the output's own rounding, p cast for P·V
HEAD_DIM = 16
# (dtype, q heads, KV heads): MHA, GQA 2 (the tiny models), GQA 3 (SmolLM2's 9 / 3).
SHAPES = [(torch.float32, 4, 2), (torch.bfloat16, 6, 2), (torch.bfloat16, 2, 2)]


class Paged:
    """A KV pool of one layer and a request→slot table over shuffled slots, filled with random K/V."""

    def __init__(self, seq_lens: list[int], kv_heads: int, dtype: torch.dtype, seed: int):
        gen = torch.Generator().manual_seed(seed)
        size = sum(seq_lens) + 1  # slot 0: the scratch slot
        self.k = torch.randn(size, kv_heads, HEAD_DIM, generator=gen).to(DEVICE, dtype)
        self.v = torch.randn(size, kv_heads, HEAD_DIM, generator=gen).to(DEVICE, dtype)
        self.table = torch.zeros(len(seq_lens) + 1, max(seq_lens) + 8, dtype=torch.int64)
        slots = (torch.randperm(size - 1, generator=gen) + 1).tolist()
        for row, n in enumerate(seq_lens):
            self.table[row + 1, :n] = torch.tensor(slots[:n])  # row 0 unused: rows need not start at 0
            slots = slots[n:]
        self.table = self.table.to(DEVICE)
        self.rows = torch.arange(1, len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)

    def reference(self, q: torch.Tensor, row: int, seq_len: int) -> torch.Tensor:
        """q [n, H, D], the last n positions of a request of seq_len → float32 causal SDPA [n, H, D]."""
        slots = self.table[row, :seq_len]
        keys, values = self.k[slots].float().transpose(0, 1), self.v[slots].float().transpose(0, 1)
        n = q.shape[0]
        visible = torch.arange(seq_len, device=DEVICE)[None, :] <= torch.arange(n, device=DEVICE)[:, None] + seq_len - n
        return F.scaled_dot_product_attention(q.float().transpose(0, 1), keys, values, attn_mask=visible,
                                              enable_gqa=True).transpose(0, 1)


def _ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _extend(paged: Paged, q: torch.Tensor, rows: list[int], seq_lens: list[int], new: list[int]) -> torch.Tensor:
    starts = [sum(new[:i]) for i in range(len(new))]
    return triton_kernels.extend_attention(q, paged.k, paged.v, paged.table, _ints(rows), _ints(seq_lens),
                                           _ints(new), _ints(starts), max(new), HEAD_DIM ** -0.5)


@pytest.mark.skipif(RUNS_HERE, reason="the tests run in this process")
def test_in_a_fresh_process_where_this_one_cannot_interpret():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@here
@pytest.mark.parametrize("dtype, heads, kv_heads", SHAPES)
def test_extend_attention_over_cached_prefixes_of_every_length_matches_the_reference(dtype, heads, kv_heads):
    # Prefix lengths 0..N in one batch, new parts of 1 token to more than a 64-token block.
    prefixes = [0, 1, 2, 15, 63, 64, 90]
    new = [70, 1, 5, 16, 2, 65, 9]
    seq_lens = [p + n for p, n in zip(prefixes, new)]
    paged = Paged(seq_lens, kv_heads, dtype, seed=heads)
    q = torch.randn(sum(new), heads, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = _extend(paged, q, [1 + i for i in range(len(new))], seq_lens, new)
    start = 0
    for row, (seq_len, n) in enumerate(zip(seq_lens, new), start=1):
        ref = paged.reference(q[start : start + n], row, seq_len)
        torch.testing.assert_close(out[start : start + n].float(), ref, atol=TOLERANCE[dtype], rtol=0)
        start += n


@here
@pytest.mark.parametrize("dtype, heads, kv_heads", SHAPES[:2])
def test_chunked_prefill_equals_one_causal_pass(dtype, heads, kv_heads):
    """A 150-token prompt prefilled in chunks of 48 (the last one short): each chunk attends over the chunks
    before it as cached prefix, and the chunks together equal causal attention over the whole prompt."""
    total, chunk = 150, 48
    paged = Paged([total], kv_heads, dtype, seed=7)
    q = torch.randn(total, heads, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    outs = [_extend(paged, q[done : done + chunk], [1], [min(done + chunk, total)], [min(chunk, total - done)])
            for done in range(0, total, chunk)]
    torch.testing.assert_close(torch.cat(outs).float(), paged.reference(q, 1, total), atol=TOLERANCE[dtype], rtol=0)


@here
@pytest.mark.parametrize("dtype, heads, kv_heads", SHAPES)
@pytest.mark.parametrize("max_splits", [1, 4])
def test_decode_attention_at_varied_lengths_matches_the_reference(dtype, heads, kv_heads, max_splits):
    # Lengths around the 64-position block; 333 with 4 splits is 3 splits of 128 positions (the last short).
    seq_lens = [1, 2, 63, 64, 65, 333]
    paged = Paged(seq_lens, kv_heads, dtype, seed=heads + max_splits)
    q = torch.randn(len(seq_lens), heads, HEAD_DIM, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    out = triton_kernels.decode_attention(q, paged.k, paged.v, paged.table, paged.rows, _ints(seq_lens),
                                          HEAD_DIM ** -0.5, max_splits=max_splits, min_split_len=1)
    for i, seq_len in enumerate(seq_lens):
        ref = paged.reference(q[i : i + 1], i + 1, seq_len)[0]
        torch.testing.assert_close(out[i].float(), ref, atol=TOLERANCE[dtype], rtol=0)


def test_capture_sizes_cover_every_batch_up_to_the_largest():
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(256)[-3:] == [224, 240, 256]
    assert capture_sizes(0) == []


@here
def test_store_kv_writes_each_new_token_into_its_slot():
    paged = Paged([8], kv_heads=2, dtype=torch.bfloat16, seed=5)
    qkv = torch.randn(3, 3 * 2 * HEAD_DIM).to(DEVICE, torch.bfloat16)  # k and v as views of a fused output
    k, v = (part.view(3, 2, HEAD_DIM) for part in qkv.split(2 * HEAD_DIM, dim=-1)[1:])
    slots = torch.tensor([5, 1, 8], device=DEVICE)
    untouched = [s for s in range(paged.k.shape[0]) if s not in (1, 5, 8)]
    before_k, before_v = paged.k[untouched].clone(), paged.v[untouched].clone()
    triton_kernels.store_kv(k, v, paged.k, paged.v, slots)
    assert torch.equal(paged.k[slots], k) and torch.equal(paged.v[slots], v)
    assert torch.equal(paged.k[untouched], before_k) and torch.equal(paged.v[untouched], before_v)


class ReplayedEagerly(GraphedModel):
    """Decode graphs whose replay runs the captured step again, eagerly: the graphs' dispatch, static
    inputs and padding, checked without CUDA."""

    def _capture_all(self):
        self.replayed = []

        def replay(size: int, batch) -> None:
            self.replayed.append(size)
            self._run_static(size, batch)

        return {size: SimpleNamespace(replay=partial(replay, size, self._static_batch(size))) for size in self.sizes}


@here
def test_greedy_generation_equals_the_torch_backend(tiny_models):
    """Prefill in chunks, decode, and a warm second round that extends cached prefixes: same tokens. The
    triton engine decodes through graphs of size 2: 3 requests run eagerly, 2 replay, 1 replays padded."""
    rng = random.Random(4)
    shared = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [shared + [7, 8], shared + [9] * 14, [rng.randrange(3, 500) for _ in range(5)]]
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (5, 4, 3)]
    outputs = {}
    for backend in ("torch", "triton"):
        with Engine(model=str(tiny_models["llama"]), device=DEVICE, dtype="float32", max_total_tokens=2048,
                    chunked_prefill_size=16, attention_backend=backend) as engine:
            assert engine.resolved_settings["attention_backend"] == backend
            if backend == "triton":
                graphs = ReplayedEagerly(engine.model, engine.scheduler.attn, [2])
                engine.run_when_idle(lambda: setattr(engine.scheduler, "model", graphs))
            cold = [o.output_ids for o in engine.generate(prompts, params)]
            warm = engine.generate(prompts, params)
            assert [o.cached_tokens for o in warm] == [len(p) - 1 for p in prompts]
            outputs[backend] = cold, [o.output_ids for o in warm]
            engine.check_integrity()
    assert outputs["triton"] == outputs["torch"]
    assert outputs["torch"][0] == outputs["torch"][1]
    assert graphs.replayed == [2, 2, 2, 2]  # per round: 2 requests, then 1 padded to 2
