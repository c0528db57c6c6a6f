"""CUDA graphs for decode steps: the model's whole decode forward, captured once per batch size at start-up
and replayed, so that a step costs a few launches instead of one per kernel (hundreds per step, which
leave the GPU idle behind the CPU at small batches).

`GraphedModel` stands in for the model in the scheduler: a decode batch of B requests is padded to the
smallest captured size >= B and replayed; prefill batches and decode batches larger than every captured
size run eagerly. Padding requests attend over one position of a valid table row and write their K/V into
the pool's scratch slot 0: they read only memory that exists and write none that anyone reads; their
logits are dropped.

Memory is bounded: every graph shares one memory pool (they never run at the same time), and they all
write their logits into one buffer of the largest size.
"""

from __future__ import annotations

import torch

from .batch import ForwardBatch
from .triton_attention import TritonBackend

SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_batch, and max_batch itself."""
    sizes = {s for s in SMALL_SIZES if s <= max_batch} | set(range(SIZE_STEP, max_batch + 1, SIZE_STEP))
    return sorted(sizes | {max_batch}) if max_batch else []


class GraphedModel:
    def __init__(self, model, attn: TritonBackend, sizes: list[int]):
        self.model = model
        self.attn = attn
        self.sizes = sorted(sizes)
        device = attn.pool.device
        largest = self.sizes[-1]
        # Static inputs, shared by every graph (each reads the first `size` entries).
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.out_slots = torch.zeros(largest, dtype=torch.int64, device=device)
        self.rows = torch.zeros(largest, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.logits = torch.empty((largest, model.config.vocab_size), dtype=torch.float32, device=device)
        with torch.inference_mode():
            self.graphs = self._capture_all()

    def _capture_all(self) -> dict[int, torch.cuda.CUDAGraph]:
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller ones reuse its pool memory.
        graphs = {size: self._capture(size, pool) for size in reversed(self.sizes)}
        torch.cuda.synchronize()
        return graphs

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            is_decode=True, input_ids=self.input_ids[:size], positions=self.positions[:size],
            out_slots=self.out_slots[:size], rows=[0] * size, seq_lens=[1] * size, extend_lens=[1] * size,
            logits_index=torch.arange(size, device=self.input_ids.device),
        )

    def _run_static(self, size: int, batch: ForwardBatch) -> None:
        self.attn.bind_decode(self.rows[:size], self.seq_lens[:size], self.out_slots[:size])
        self.logits[:size].copy_(self.model.forward(batch, self.attn))

    def _capture(self, size: int, pool) -> torch.cuda.CUDAGraph:
        batch = self._static_batch(size)
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), as torch's recipe asks.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run_static(size, batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._run_static(size, batch)
        return graph

    def covers(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.num_tokens <= self.sizes[-1]

    def forward(self, batch: ForwardBatch, attn: TritonBackend) -> torch.Tensor:
        """The model's forward: replayed for decode batches the graphs cover, eager otherwise. `attn` has been
        prepared for `batch` (the scheduler's order), so its decode inputs are on the device already."""
        if not self.covers(batch):
            return self.model.forward(batch, attn)
        n = batch.num_tokens
        size = next(s for s in self.sizes if s >= n)
        for static, values in ((self.input_ids, batch.input_ids), (self.positions, batch.positions),
                               (self.out_slots, batch.out_slots), (self.rows, attn.rows),
                               (self.seq_lens, attn.seq_lens)):
            static[:n].copy_(values)
        # Padding keeps an earlier batch's token ids, positions and rows (valid values all), but must not
        # write into a slot that may be live now, nor attend over a long stale length.
        self.out_slots[n:size].fill_(0)
        self.seq_lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.logits[batch.logits_index]
