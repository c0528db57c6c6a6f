"""What one forward step computes: the scheduler builds it, the model and attention backend read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A flat batch of new tokens from several requests (extend = prefill chunks, decode = one each).

    Request i contributes tokens [starts[i], starts[i] + extend_lens[i]) of `input_ids`; its KV slots
    for positions [0, seq_lens[i]) are row `rows[i]` of the request→slot table, already including
    `out_slots` for the new tokens.
    """

    is_decode: bool
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64, where the new tokens' K/V are written
    rows: list[int]
    seq_lens: list[int]
    extend_lens: list[int]
    logits_index: torch.Tensor  # token indices whose logits are returned

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def starts(self) -> list[int]:
        out, acc = [], 0
        for n in self.extend_lens:
            out.append(acc)
            acc += n
        return out
