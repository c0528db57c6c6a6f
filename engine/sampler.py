"""Turns a batch of logits into next tokens (and their logprobs), one row per request.

Order per row, as in SGLang/vLLM: logit bias → penalties → min_new_tokens mask → grammar mask →
(greedy: argmax) → temperature → top-k → top-p → min-p → draw with the request's own generator
(seeded per output position: see Req.draw).
Logprobs are those of the raw distribution, before any of these. Each request owns a
seeded torch.Generator, so its samples do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar import apply_bitmask
from .request import Req


@dataclass(frozen=True)
class GrammarMasks:
    """The allowed tokens of the batch's constrained rows: bitmask row i belongs to logits row rows[i]."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), ceil(V / 32)]

    def apply(self, logits: torch.Tensor) -> None:
        if len(self.rows) == logits.shape[0]:
            apply_bitmask(logits, self.bitmask)
            return
        index = torch.tensor(self.rows, device=logits.device)
        constrained = logits[index]
        apply_bitmask(constrained, self.bitmask)
        logits[index] = constrained


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # log p(chosen token) under the raw distribution
    top_logprobs: list[list[tuple[int, float]]] | None


def apply_logit_bias(logits: torch.Tensor, reqs: list[Req]) -> None:
    """In place. Adds each request's logit_bias (token id → bias) to its row."""
    for i, req in enumerate(reqs):
        bias = req.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), device=logits.device)


def apply_penalties(logits: torch.Tensor, reqs: list[Req]) -> None:
    """In place. Repetition penalty over prompt + output (HF); frequency/presence over output (OpenAI)."""
    for i, req in enumerate(reqs):
        p = req.params
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.origin_input_ids) | set(req.output_ids)), device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if req.output_ids and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.tensor(req.output_ids, device=logits.device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def mask_stop_tokens_before_min(logits: torch.Tensor, reqs: list[Req]) -> None:
    for i, req in enumerate(reqs):
        if len(req.output_ids) < req.params.min_new_tokens and req.stop_token_ids:
            logits[i, list(req.stop_token_ids)] = float("-inf")


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Zero the tokens that top-k, top-p and min-p exclude from one row of probabilities (not renormalised)."""
    if top_k > 0 and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        drop = mass_before > top_p * sorted_probs.sum()
        probs = probs.clone()
        probs[order[drop]] = 0
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    return probs


def sample(logits: torch.Tensor, reqs: list[Req], masks: GrammarMasks | None = None) -> SampleOutput:
    """logits [B, V] float32 (modified in place)."""
    want_logprobs = any(r.logprobs.return_logprob for r in reqs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    apply_logit_bias(logits, reqs)
    apply_penalties(logits, reqs)
    mask_stop_tokens_before_min(logits, reqs)
    if masks is not None:
        masks.apply(logits)
    tokens: list[int] = logits.argmax(dim=-1).tolist()  # one call for the whole batch; sampled rows overwrite theirs
    for i, req in enumerate(reqs):
        p = req.params
        if p.greedy:
            continue
        probs = filter_probs(torch.softmax(logits[i] / p.temperature, dim=-1), p.top_k, p.top_p, p.min_p)
        cdf = probs.cumsum(0)
        # The request's generator lives on the CPU whatever the device, so a seed means the same draws.
        u = req.draw().to(cdf.device) * cdf[-1]
        tokens[i] = min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)
    if raw_logprobs is None:
        return SampleOutput(tokens, None, None)
    chosen = raw_logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    tops = [top_logprobs(row, req.logprobs.top_logprobs_num) for row, req in zip(raw_logprobs, reqs)]
    return SampleOutput(tokens, chosen, tops)


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of one row of logprobs."""
    if k <= 0:
        return []
    vals, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), vals.tolist()))
