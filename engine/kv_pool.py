"""Token-granular KV memory: one pool allocated at start, plus the request→slot table.

Slot 0 is a scratch slot that is never handed out: padded positions of a batch read and write it, so
a padded gather needs no masking of indices. Usable slots are 1..size.

Invariant (kept by alloc/free, checked by `check`): every usable slot is either in the free list or
owned by exactly one holder (the radix cache or a running request). The scheduler's integrity check
adds the holders up: free + cached + held-by-running == size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


class KVPool:
    """K and V buffers of shape [layers, slots, kv_heads, head_dim] and a free list of slot ids."""

    def __init__(self, layout: KVLayout, size: int, device: torch.device):
        if size < 1:
            raise ValueError("KV pool needs at least one slot")
        self.layout = layout
        self.size = size
        self.device = device
        shape = (layout.num_layers, size + 1, layout.num_kv_heads, layout.head_dim)
        self.k = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.v = torch.zeros(shape, dtype=layout.dtype, device=device)
        self._free = torch.arange(1, size + 1, dtype=torch.int64, device=device)

    def available(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slot ids, or None when fewer than n are free (the caller evicts and retries)."""
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(torch.int64)])

    def check(self) -> None:
        free = self._free
        assert free.numel() == torch.unique(free).numel(), "a slot is on the free list twice"
        assert free.numel() == 0 or (int(free.min()) >= 1 and int(free.max()) <= self.size), "slot out of range"

    def free_slots(self) -> torch.Tensor:
        return self._free


class ReqToTokenTable:
    """Row r holds the KV slot of each token position of the request that owns row r."""

    def __init__(self, max_rows: int, max_context: int, device: torch.device):
        self.table = torch.zeros((max_rows, max_context), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def num_free(self) -> int:
        return len(self._free_rows)
