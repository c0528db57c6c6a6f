"""Attention backends behind one small interface, chosen by name.

A backend writes each layer's new K/V into the pool and attends over every cached position of each
request. `torch` is the reference: plain SDPA, runs on CPU and CUDA. `cpu` is the reference plus a
paged decode kernel in C++ (below), the default on CPU. `triton` (engine/triton_attention.py) is the
default on CUDA. The names are declared in `settings.ATTENTION_BACKENDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .batch import ForwardBatch
from .kv_pool import KVPool, ReqToTokenTable
from .settings import ATTENTION_BACKENDS


class AttentionBackend(ABC):
    def __init__(self, pool: KVPool, table: ReqToTokenTable):
        self.pool = pool
        self.table = table

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-step metadata once, before the layers run."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the batch's new tokens → attention output [T, H*D]."""


class TorchBackend(AttentionBackend):
    """Decode: one padded SDPA call over all requests. Extend: one SDPA call per request."""

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch
        device = self.pool.device
        if batch.is_decode:
            lens = torch.tensor(batch.seq_lens, device=device)
            max_len = int(max(batch.seq_lens))
            slots = self.table.table[batch.rows, :max_len]
            valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
            # Padded positions read the scratch slot 0 and are masked out.
            self.decode_slots = torch.where(valid, slots, torch.zeros_like(slots))
            self.decode_mask = valid[:, None, None, :]  # [B, 1, 1, L]
        else:
            self.extend_meta = []
            for row, seq_len, n_new, start in zip(batch.rows, batch.seq_lens, batch.extend_lens, batch.starts):
                slots = self.table.table[row, :seq_len]
                prefix = seq_len - n_new
                mask = None
                if prefix > 0 and n_new > 1:
                    # New token i sits at position prefix + i and sees positions <= prefix + i.
                    cols = torch.arange(seq_len, device=device)[None, :]
                    rows_ = torch.arange(n_new, device=device)[:, None] + prefix
                    mask = cols <= rows_
                self.extend_meta.append((start, n_new, slots, mask, prefix == 0 and n_new > 1))

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' K/V in their slots; the layer's pool K and V."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        pool_k.index_copy_(0, self.batch.out_slots, k)  # index_copy_: a plain row scatter, cheaper than index_put
        pool_v.index_copy_(0, self.batch.out_slots, v)
        return pool_k, pool_v

    def forward(self, q, k, v, layer):
        pool_k, pool_v = self.write_kv(k, v, layer)
        num_heads, head_dim = q.shape[1], q.shape[2]
        if self.batch.is_decode:
            # index_select copies whole rows; it is ~10x faster on CPU than advanced indexing.
            shape = (*self.decode_slots.shape, *pool_k.shape[1:])  # [B, L, KVH, D]
            keys = pool_k.index_select(0, self.decode_slots.flatten()).view(shape).transpose(1, 2)
            values = pool_v.index_select(0, self.decode_slots.flatten()).view(shape).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q[:, :, None, :], keys, values, attn_mask=self.decode_mask, enable_gqa=True
            )
            return out.reshape(q.shape[0], num_heads * head_dim)
        out = torch.empty_like(q)
        for start, n_new, slots, mask, causal in self.extend_meta:
            qi = q[start : start + n_new].transpose(0, 1)[None]  # [1, H, n, D]
            keys = pool_k.index_select(0, slots).transpose(0, 1)[None]
            values = pool_v.index_select(0, slots).transpose(0, 1)[None]
            oi = F.scaled_dot_product_attention(qi, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
            out[start : start + n_new] = oi[0].transpose(0, 1)
        return out.reshape(q.shape[0], num_heads * head_dim)


class CpuPagedBackend(TorchBackend):
    """Decode with our C++ kernel (kernels/decode_attention.cpp), which reads each request's K/V straight
    from the pool through its slot-table row: no per-step gather, no second copy of the KV, and requests
    that share a prefix read the same memory, which stays in the CPU caches. Extend uses the reference."""

    def __init__(self, pool: KVPool, table: ReqToTokenTable):
        super().__init__(pool, table)
        self.kernel = cpu_kernels.load("decode_attention")

    def prepare(self, batch: ForwardBatch) -> None:
        if not batch.is_decode:
            return super().prepare(batch)
        self.batch = batch
        self.decode_slots = self.table.table[batch.rows, : max(batch.seq_lens)]
        self.decode_lens = torch.tensor(batch.seq_lens, dtype=torch.int64)

    def forward(self, q, k, v, layer):
        if not self.batch.is_decode:
            return super().forward(q, k, v, layer)
        pool_k, pool_v = self.write_kv(k, v, layer)
        out = self.kernel.decode_attention(q, pool_k, pool_v, self.decode_slots, self.decode_lens, q.shape[-1] ** -0.5)
        return out.reshape(q.shape[0], -1)


def _triton_backend(pool: KVPool, table: ReqToTokenTable) -> AttentionBackend:
    """Imported on first use: triton is optional, and the import decides whether its kernels are compiled
    or interpreted (TRITON_INTERPRET)."""
    try:
        from .triton_attention import TritonBackend
    except ImportError as exc:
        raise cpu_kernels.KernelUnavailable(f"the triton backend needs triton: {exc}") from exc
    return TritonBackend(pool, table)


_BACKENDS: dict[str, Callable[[KVPool, ReqToTokenTable], AttentionBackend]] = {
    "torch": TorchBackend,
    "cpu": CpuPagedBackend,
    "triton": _triton_backend,
}
assert tuple(_BACKENDS) == ATTENTION_BACKENDS, "settings.ATTENTION_BACKENDS names the backends the engine accepts"


def create_attention_backend(name: str, pool: KVPool, table: ReqToTokenTable) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name](pool, table)
