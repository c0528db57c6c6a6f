"""The `triton` attention backend: the kernels of engine/triton_kernels.py behind the backend interface.

The default on CUDA. On CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1, set before this
module is imported), which is how its tests check it against the `torch` reference without a GPU.

A decode step's inputs (`rows`, `seq_lens`, `out_slots`) are device tensors whose shapes depend only on
the batch size, and the kernels' grids likewise: engine/cuda_graphs.py captures a step with its own
static copies of them (`bind_decode`) and replays it after copying each real batch's values in.
"""

from __future__ import annotations

import torch

from .attention import AttentionBackend
from .batch import ForwardBatch
from .kv_pool import KVPool, ReqToTokenTable
from .triton_kernels import DECODE_MAX_SPLITS, decode_attention, extend_attention, store_kv


class TritonBackend(AttentionBackend):
    def __init__(self, pool: KVPool, table: ReqToTokenTable):
        super().__init__(pool, table)
        self.scale = pool.layout.head_dim ** -0.5
        # Splitting a request's positions keeps a GPU's many SMs busy on small batches of long requests;
        # the interpreter runs programs one after another, where splits only add programs.
        self.max_splits = DECODE_MAX_SPLITS if pool.device.type == "cuda" else 1

    def prepare(self, batch: ForwardBatch) -> None:
        self.is_decode = batch.is_decode
        columns = [batch.rows, batch.seq_lens] if batch.is_decode else [
            batch.rows, batch.seq_lens, batch.extend_lens, batch.starts]
        meta = torch.tensor(columns, dtype=torch.int32, device=self.pool.device)  # one host→device copy
        if batch.is_decode:
            self.bind_decode(meta[0], meta[1], batch.out_slots)
        else:
            self.rows, self.seq_lens, self.extend_lens, self.starts = meta
            self.out_slots = batch.out_slots
            self.max_extend_len = max(batch.extend_lens)

    def bind_decode(self, rows: torch.Tensor, seq_lens: torch.Tensor, out_slots: torch.Tensor) -> None:
        """Decode the next forward with these inputs: int32 table rows and lengths (the new token included),
        int64 slots for the new tokens' K/V."""
        self.is_decode = True
        self.rows, self.seq_lens, self.out_slots = rows, seq_lens, out_slots

    def forward(self, q, k, v, layer):
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        store_kv(k, v, pool_k, pool_v, self.out_slots)
        table = self.table.table
        if self.is_decode:
            out = decode_attention(q, pool_k, pool_v, table, self.rows, self.seq_lens, self.scale, self.max_splits)
        else:
            out = extend_attention(q, pool_k, pool_v, table, self.rows, self.seq_lens, self.extend_lens, self.starts,
                                   self.max_extend_len, self.scale)
        return out.view(q.shape[0], -1)
