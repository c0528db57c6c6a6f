"""Triton kernels of the `triton` attention backend: they read K/V in place from the token-granular pool
through the request→slot table (no gather copies), so requests that share a cached prefix read the
same memory.

    store_kv            new tokens' K/V into their pool slots (one launch for K and V)
    extend_attention    prefill chunks over a cached prefix: variable lengths, causal within the new part
    decode_attention    one query per request, split-K (flash-decoding) so that a few long requests still
                        fill the GPU; the q heads of one KV head (GQA) share each K/V load

Shapes: q [T, H, D]; pool K/V of one layer [slots, KVH, D]; table [rows, context] int64 slot ids.
Positions past a request's length read the table's slot ids as they are, or slot 0 (the pool's scratch
slot) where the load is masked: every load stays inside the pool, and masked scores are -inf.

Triton decides at decoration time whether a function is compiled or interpreted, triton.language's own
when triton is imported: TRITON_INTERPRET=1 must be set before that (the tests and the `--smoke`
benchmark do so on machines without CUDA).
Float32 models' dot products ask for "ieee" precision, to attend in float32 as the reference does (the
default, tf32, rounds operands to 10 mantissa bits); bf16/fp16 ones keep the default, which leaves them as
they are.
Grids depend only on batch sizes and constants, never on sequence lengths, so a decode step can be
captured in a CUDA graph and replayed with other lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Triton 3.9's interpreter multiplies bfloat16 operands of tl.dot as their raw uint16 bits; under it the
# kernels upcast dot operands to float32 (exact: bf16 values are representable in fp32).
INTERPRETED = triton.knobs.runtime.interpret
LOG2E = 1.4426950408889634

EXTEND_BLOCK_M = 64
EXTEND_BLOCK_N = 64
DECODE_BLOCK_N = 64
# Decode splits each request's positions into at most this many parts, each at least this long:
# a batch of short requests stays at one or two parts (few partial results to combine), one long
# request uses all of them.
DECODE_MAX_SPLITS = 16
DECODE_MIN_SPLIT_LEN = 256


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, pool_k_ptr, pool_v_ptr, slots_ptr, stride_k, stride_v, stride_slot,
                     row_elems, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_elems
    slot = tl.load(slots_ptr + token)
    k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
    tl.store(pool_k_ptr + slot * stride_slot + offs, k, mask=mask)
    tl.store(pool_v_ptr + slot * stride_slot + offs, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """pool_k[slots[t]] = k[t] and the same for v; k/v [T, KVH, D] with each token's KVH*D contiguous."""
    num_tokens, kv_heads, head_dim = k.shape
    row_elems = kv_heads * head_dim
    assert k.stride(1) == v.stride(1) == head_dim and k.stride(2) == v.stride(2) == 1, "a token's K/V is one run"
    assert pool_k.is_contiguous() and pool_v.is_contiguous()
    block = min(triton.next_power_of_2(row_elems), 1024)
    grid = (num_tokens, triton.cdiv(row_elems, block))
    _store_kv_kernel[grid](k, v, pool_k, pool_v, slots, k.stride(0), v.stride(0), pool_k.stride(0), row_elems,
                           BLOCK=block)


@triton.jit
def _kv_block(pool_k_ptr, pool_v_ptr, table_row, n, limit, kv_head, d, d_ok, stride_slot, stride_kvh,
              UPCAST: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] of a request's positions n, read in place through its table row
    (positions from `limit` on read the scratch slot 0)."""
    slots = tl.load(table_row + n, mask=n < limit, other=0)
    kv_offs = slots[:, None] * stride_slot + kv_head * stride_kvh + d[None, :]
    k = tl.load(pool_k_ptr + kv_offs, mask=d_ok[None, :], other=0.0)
    v = tl.load(pool_v_ptr + kv_offs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _softmax_step(scores, v, max_score, denom, acc, DOT_PRECISION: tl.constexpr):
    """One key block of an online softmax (scores in log2 units, masked ones -inf): the running maximum,
    denominator and weighted sum of values, rescaled to the new maximum."""
    new_max = tl.maximum(max_score, tl.max(scores, 1))
    rescale = tl.exp2(max_score - new_max)
    p = tl.exp2(scores - new_max[:, None])
    denom = denom * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, denom, acc


@triton.jit
def _extend_kernel(q_ptr, out_ptr, pool_k_ptr, pool_v_ptr, table_ptr, rows_ptr, seq_lens_ptr, extend_lens_ptr,
                   starts_ptr, stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_kvh, stride_table,
                   scale_log2, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M new tokens of one request, one q head, over every position they may see."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_M
    n_new = tl.load(extend_lens_ptr + req)
    if first >= n_new:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    start = tl.load(starts_ptr + req)
    table_row = table_ptr + tl.load(rows_ptr + req).to(tl.int64) * stride_table
    prefix = seq_len - n_new
    kv_head = head // GROUP

    m = first + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_mask = (m < n_new)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (start + m)[:, None] * stride_qt + head * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    max_score = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # New token i (position prefix + i) sees positions <= prefix + i: past this block's last token, nothing.
    end = tl.minimum(seq_len, prefix + first + BLOCK_M)
    for block_start in range(0, end, BLOCK_N):
        n = block_start + tl.arange(0, BLOCK_N)
        k, v = _kv_block(pool_k_ptr, pool_v_ptr, table_row, n, end, kv_head, d, d_ok, stride_slot, stride_kvh,
                         UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (n[None, :] <= prefix + m[:, None]) & (n < end)[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        # Every row sees position 0, so its running maximum is finite from the first block on.
        max_score, denom, acc = _softmax_step(scores, v, max_score, denom, acc, DOT_PRECISION)

    out = acc / denom[:, None]
    tl.store(out_ptr + (start + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def extend_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor, starts: torch.Tensor,
                     max_extend_len: int, scale: float) -> torch.Tensor:
    """Attention of each request's new tokens q[starts[i] : starts[i] + extend_lens[i]] over its positions
    [0, seq_lens[i]), whose K/V (the new tokens' included) are in the pool → out [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    grid = (rows.numel(), num_heads, triton.cdiv(max_extend_len, EXTEND_BLOCK_M))
    _extend_kernel[grid](
        q, out, pool_k, pool_v, table, rows, seq_lens, extend_lens, starts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), pool_k.stride(0), pool_k.stride(1), table.stride(0),
        scale * LOG2E, GROUP=num_heads // pool_k.shape[1], HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=EXTEND_BLOCK_M, BLOCK_N=EXTEND_BLOCK_N, UPCAST=INTERPRETED, DOT_PRECISION=_dot_precision(q),
    )
    return out


@triton.jit
def _decode_split_kernel(q_ptr, pool_k_ptr, pool_v_ptr, table_ptr, rows_ptr, seq_lens_ptr, part_out_ptr,
                         part_lse_ptr, stride_qb, stride_qh, stride_slot, stride_kvh, stride_table, scale_log2,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         MIN_SPLIT_LEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: one request, the GROUP q heads of one KV head, one split of its positions. Writes the
    split's normalised output and log2-sum-exp per head; an empty split writes lse = -inf only."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    # Whole blocks per split, so that only a split's last block is masked. (Integer division, not tl.cdiv:
    # each nested jit call costs the interpreter a re-patching of triton.language.)
    per_split = tl.maximum((seq_len + NUM_SPLITS - 1) // NUM_SPLITS, MIN_SPLIT_LEN)
    split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + h
    h_ok = h < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # Partial results are [B, H, NUM_SPLITS] (+ [D] for the output), contiguous.
    lse_offs = (req * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
    if lo >= hi:
        tl.store(part_lse_ptr + lse_offs, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=h_ok)
        return
    table_row = table_ptr + tl.load(rows_ptr + req).to(tl.int64) * stride_table
    q = tl.load(q_ptr + req * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    max_score = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for block_start in range(lo, hi, BLOCK_N):
        n = block_start + tl.arange(0, BLOCK_N)
        k, v = _kv_block(pool_k_ptr, pool_v_ptr, table_row, n, hi, kv_head, d, d_ok, stride_slot, stride_kvh,
                         UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where((n < hi)[None, :], scores, float("-inf"))
        max_score, denom, acc = _softmax_step(scores, v, max_score, denom, acc, DOT_PRECISION)

    tl.store(part_out_ptr + lse_offs[:, None] * HEAD_DIM + d[None, :], acc / denom[:, None],
             mask=h_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + lse_offs, max_score + tl.log2(denom), mask=h_ok)


@triton.jit
def _decode_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program: one request, one q head; the splits' outputs weighted by their share of the softmax.
    Empty splits (lse -inf) weigh nothing and their outputs, never written, are not read."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (req * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    used = lse > float("-inf")
    weights = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty: the maximum is finite
    parts = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=used[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + req * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_splits: int = DECODE_MAX_SPLITS,
                     min_split_len: int = DECODE_MIN_SPLIT_LEN) -> torch.Tensor:
    """Attention of request i's one query q[i] over its positions [0, seq_lens[i]) → out [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    kv_heads = pool_k.shape[1]
    group = num_heads // kv_heads
    part_out = torch.empty((batch, num_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_heads, max_splits), dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    _decode_split_kernel[(batch, kv_heads, max_splits)](
        q, pool_k, pool_v, table, rows, seq_lens, part_out, part_lse,
        q.stride(0), q.stride(1), pool_k.stride(0), pool_k.stride(1), table.stride(0), scale * LOG2E,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows at least
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N, NUM_SPLITS=max_splits,
        MIN_SPLIT_LEN=min_split_len, UPCAST=INTERPRETED, DOT_PRECISION=_dot_precision(q),
    )
    out = torch.empty_like(q)
    _decode_combine_kernel[(batch, num_heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=block_d,
        NUM_SPLITS=max_splits, BLOCK_S=triton.next_power_of_2(max_splits),
    )
    return out


def _dot_precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # tf32, the default, applies to float32 operands only


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot's inner dimension is 16 at least
