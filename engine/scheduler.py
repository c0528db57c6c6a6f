"""Continuous batching over one model: admission, chunked prefill, decode, retraction, abort.

One `step()` runs one forward pass. Prefill comes first: if any waiting request can be admitted (or
a chunked prefill is in flight) the step is an extend batch; otherwise every running request decodes
one token. Requests join and leave between steps.

Requests share while they run (SGLang's RadixAttention with `cache_unfinished_req`): after every
prefill chunk a request's computed KV goes into the radix cache and stays locked there while it runs,
so a request admitted one step later reuses it. Requests waiting on a prefix that a request of the
same step is computing are held back for a step instead of computing it again (in-batch prefix caching).

Constrained requests (engine/grammar.py): each step's sampling is masked by every constrained request's
grammar. Where a grammar allows a single continuation, the run of tokens is appended unsampled
(jump-forward): at admission it is prefilled with the prompt; after a decode step the request goes back
to the head of the queue, its KV to the cache, and the run is extended in the next step.

Memory invariant (checked by `check_integrity`): every usable KV slot is exactly one of
  free (pool free list) | held by the radix cache | held by one active request
where a request holds row[prefix_len:kv_len] of its slot-table row (row[:prefix_len] is the cache's,
locked through `last_node`: after a prefill step prefix_len == kv_len, so only decoded tokens are the
request's own). When idle, free + cached == pool size and nothing is locked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import torch

from .attention import AttentionBackend
from .batch import ForwardBatch
from .grammar import GrammarBackend
from .kv_pool import KVPool, ReqToTokenTable
from .radix_cache import RadixCache
from .request import FinishReason, Req
from .sampler import GrammarMasks, sample, top_logprobs
from .settings import SchedulerConfig

log = structlog.get_logger(__name__)

# SGLang's admission heuristic: reserve a shrinking fraction of each request's remaining max_new_tokens.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.098
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
RETRACT_RATIO_STEP = 0.1
LPM_FALLBACK_QUEUE_LEN = 128
# A waiting request that shares at least this many not-yet-cached tokens with a request being prefilled
# in the same step waits one step and then reads them from the cache (SGLang's threshold too).
IN_BATCH_PREFIX_THRESHOLD = 32


@dataclass
class SchedulerStats:
    forward_tokens: int = 0  # tokens run through the model (prefill + decode)
    prefill_tokens: int = 0  # of which in extend (prefill) batches
    held_back: int = 0  # admissions deferred because a request of the same step computes their prefix
    forced_tokens: int = 0  # constrained output tokens emitted without sampling (jump-forward)
    retractions: int = 0
    aborted: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0


class Scheduler:
    def __init__(self, model, attn: AttentionBackend, pool: KVPool, table: ReqToTokenTable, cache: RadixCache,
                 config: SchedulerConfig, grammar: GrammarBackend | None = None):
        self.model = model
        self.grammar = grammar
        self.attn = attn
        self.pool = pool
        self.table = table
        self.cache = cache
        self.config = config
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # decoding
        self.chunked: Req | None = None  # prefill in progress across steps
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.stats = SchedulerStats()
        self._abort_rids: set[str] = set()
        self._last_log = {True: 0.0, False: 0.0}  # per is_decode: time of the last batch log line
        self._generated_at_last_log = 0

    # ---- requests in and out -------------------------------------------------------------------

    def add(self, req: Req) -> None:
        if req.resumed is not None:  # continued from another engine: its output so far, then the snapshot
            req.replay()             # of that point (shown already: the caller skips it unless finished)
            if req.finished:
                self._finish(req, replayed=True)
                return
            req.on_output(req.snapshot(replayed=True))
        if self._jumps_forward(req) and not req.output_ids:
            self._jump_forward(req)  # a forced opening (e.g. '{"name": "') is prefilled with the prompt
            if req.finished:  # the grammar was one fixed string
                self._finish(req)
                return
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        """Takes effect at the start of the next step (the scheduler thread owns all state)."""
        self._abort_rids.add(rid)

    def abort_all(self) -> None:
        self._abort_rids.update(r.rid for r in self.waiting + self.active_requests())

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self._abort_rids)

    def _finish(self, req: Req, replayed: bool = False) -> None:
        self._release(req)
        self.stats.finished += 1
        req.on_output(req.snapshot(replayed))

    def _release(self, req: Req) -> None:
        """Hand the request's computed KV to the radix cache and give back its row."""
        if req.row is None:
            return
        slots = self.table.table[req.row, : req.kv_len].clone()
        existing = self.cache.insert(req.all_ids[: req.kv_len], slots)
        # The cache already held tokens [prefix_len, existing) under other slots: ours are duplicates.
        self.pool.free(slots[req.prefix_len : existing])
        self.cache.dec_lock_ref(req.last_node)
        self.table.free(req.row)
        req.row, req.kv_len, req.prefix_len, req.last_node = None, 0, 0, None

    def _cache_computed(self, req: Req) -> None:
        """Put req's computed KV into the cache now, locked, instead of when it finishes: requests admitted
        from the next step on reuse it. Where another request inserted the same tokens first, ours are
        duplicates: freed, and the row points at the tree's slots (same tokens, same positions, same KV)."""
        if self.cache.disable or req.prefix_len == req.kv_len:
            return
        key = req.all_ids[: req.kv_len]
        row = self.table.table[req.row]
        existing = self.cache.insert(key, row[: req.kv_len])
        self.pool.free(row[req.prefix_len : existing].clone())
        match = self.cache.match_prefix(key)
        row[: req.kv_len] = match.indices
        self.cache.inc_lock_ref(match.node)
        self.cache.dec_lock_ref(req.last_node)
        req.prefix_len, req.last_node = req.kv_len, match.node

    def _process_aborts(self) -> None:
        if not self._abort_rids:
            return
        rids, self._abort_rids = self._abort_rids, set()
        for req in [r for r in self.waiting if r.rid in rids]:
            self.waiting.remove(req)
            self._abort(req)
        for req in [r for r in self.running if r.rid in rids]:
            self.running.remove(req)
            self._abort(req)
        if self.chunked is not None and self.chunked.rid in rids:
            req, self.chunked = self.chunked, None
            self._abort(req)

    def _abort(self, req: Req) -> None:
        req.finish_reason = FinishReason("abort", message="aborted")
        self.stats.aborted += 1
        self._finish(req)

    # ---- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        self._process_aborts()
        prefill = self._schedule_prefill()
        if prefill:
            self._run_batch(prefill, is_decode=False)
        elif self.running:
            self._run_batch(self._schedule_decode(), is_decode=True)
        else:
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def _ordered_waiting(self) -> list[Req]:
        if self.config.schedule_policy == "lpm" and len(self.waiting) <= LPM_FALLBACK_QUEUE_LEN:
            # Longest cached prefix first (stable, so ties stay in arrival order).
            lengths = {id(r): len(self.cache.match_prefix(self._match_key(r)).indices) for r in self.waiting}
            return sorted(self.waiting, key=lambda r: -lengths[id(r)])
        return list(self.waiting)

    def _match_key(self, req: Req) -> list[int]:
        # The last token is always computed (its logits pick the next token); prompt logprobs need
        # logits from position logprob_start_len - 1 on.
        limit = len(req.all_ids) - 1
        if req.needs_input_logprobs and not req.input_logprobs_done:
            limit = min(limit, max(req.logprobs.logprob_start_len - 1, 0))
        return req.all_ids[:limit]

    def _schedule_prefill(self) -> list[tuple[Req, int]]:
        """(request, tokens to compute this step) for an extend batch; [] when nothing can start."""
        budget = self.config.prefill_step_tokens  # over the whole step; each chunk is also capped
        batch: list[tuple[Req, int]] = []
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            n = self._extend_into_row(req, budget, allow_retract=True)
            if n is None:  # out of KV even after retracting every decode: wait for the next step
                self.chunked = req
                return []
            batch.append((req, n))
            budget -= n
            if req.kv_len + n < len(req.all_ids):
                self.chunked = req
                return batch
        headroom = (self.pool.available() + self.cache.evictable_size()
                    - sum(r.reserved_tokens(self.new_token_ratio) for r in self.running))
        for req in self._ordered_waiting():
            active = len(self.running) + len(batch)
            if budget <= 0 or active >= self.config.max_running_requests:
                break
            match = self.cache.match_prefix(self._match_key(req))
            if self._prefix_computed_in(batch, req, len(match.indices)):
                self.stats.held_back += 1
                continue
            remaining = len(req.all_ids) - len(match.indices)
            cost = remaining + req.reserved_tokens(self.new_token_ratio)
            if cost > headroom and (batch or self.running):
                break  # keep arrival order: do not let later requests overtake this one
            self.cache.inc_lock_ref(match.node)  # before any eviction, so the prefix stays
            row = self.table.alloc()
            if row is None:
                self.cache.dec_lock_ref(match.node)
                break
            prefix_len = len(match.indices)
            self.table.table[row, :prefix_len] = match.indices
            req.row, req.kv_len, req.prefix_len, req.last_node = row, prefix_len, prefix_len, match.node
            n = self._extend_into_row(req, budget, allow_retract=False)
            if n is None:
                self._release(req)
                break
            if not req.admitted:
                req.admitted = True
                # Forced output tokens prefill with the prompt and may be cached: count prompt tokens only.
                req.cached_tokens = min(prefix_len, len(req.origin_input_ids))
                self.stats.prompt_tokens += len(req.origin_input_ids)
                self.stats.cached_tokens += req.cached_tokens
            self.waiting.remove(req)
            batch.append((req, n))
            budget -= n
            headroom -= cost
            if req.kv_len + n < len(req.all_ids):
                self.chunked = req
                break
        return batch

    @staticmethod
    def _prefix_computed_in(batch: list[tuple[Req, int]], req: Req, cached: int) -> bool:
        """Whether a request of this step's batch computes at least IN_BATCH_PREFIX_THRESHOLD of req's
        uncached prompt tokens (it shares req's first cached + threshold tokens)."""
        end = cached + IN_BATCH_PREFIX_THRESHOLD
        ids = req.all_ids
        if len(ids) <= end:
            return False
        head = ids[:end]
        return any(len(other.all_ids) > end and other.all_ids[:end] == head for other, _ in batch)

    def _extend_into_row(self, req: Req, budget: int, allow_retract: bool) -> int | None:
        """Allocate slots for the next chunk of req's uncomputed tokens; returns the chunk length.
        Only a prefill already under way may retract decoding requests: a new one waits instead."""
        n = min(len(req.all_ids) - req.kv_len, budget, self.config.chunked_prefill_size)
        slots = self._alloc(n, allow_retract)
        if slots is None:
            return None
        self.table.table[req.row, req.kv_len : req.kv_len + n] = slots
        return n

    def _alloc(self, n: int, allow_retract: bool) -> torch.Tensor | None:
        """n free slots, evicting cache leaves and then (if allowed) retracting decode requests."""
        while True:
            short = n - self.pool.available()
            if short > 0:
                self.cache.evict(short)
            slots = self.pool.alloc(n)
            if slots is not None or not (allow_retract and self.running):
                return slots
            self._retract_one()

    def _retract_one(self) -> None:
        # SGLang's order: the request with the fewest generated tokens goes first (ties: longest prompt).
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        self.running.remove(victim)
        self._release(victim)  # its KV becomes evictable cache; re-admission may reuse what survives
        self.stats.retractions += 1
        self.waiting.insert(0, victim)
        self.new_token_ratio = min(1.0, self.new_token_ratio + RETRACT_RATIO_STEP)

    def _schedule_decode(self) -> list[tuple[Req, int]]:
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        # Each decoding request needs one slot; when even eviction cannot free them, retract.
        while (slots := self._alloc(len(self.running), allow_retract=False)) is None:
            if len(self.running) == 1:
                raise RuntimeError("KV pool cannot hold one more token for a single request")
            self._retract_one()
        for req, slot in zip(self.running, slots):
            self.table.table[req.row, req.kv_len] = slot
        return [(req, 1) for req in self.running]

    def _run_batch(self, batch: list[tuple[Req, int]], is_decode: bool) -> None:
        input_ids, positions, out_slots, logits_index = [], [], [], []
        sampled: list[tuple[Req, int]] = []  # requests whose last position picks a token, with its logits row
        prompt_spans: list[tuple[Req, int, int]] = []  # (req, first logits row, count) for prompt logprobs
        for req, n in batch:
            start = len(input_ids)
            input_ids += req.all_ids[req.kv_len : req.kv_len + n]
            positions += range(req.kv_len, req.kv_len + n)
            out_slots.append(self.table.table[req.row, req.kv_len : req.kv_len + n])
            completes = req.kv_len + n == len(req.all_ids)
            if req.needs_input_logprobs and not req.input_logprobs_done:
                prompt_spans.append((req, len(logits_index), n))
                logits_index += range(start, start + n)
            elif completes:
                logits_index.append(start + n - 1)
            if completes:
                sampled.append((req, len(logits_index) - 1))
        device = self.pool.device
        fb = ForwardBatch(
            is_decode=is_decode,
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            out_slots=torch.cat(out_slots),
            rows=[req.row for req, _ in batch],
            seq_lens=[req.kv_len + n for req, n in batch],
            extend_lens=[n for _, n in batch],
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
        )
        self.attn.prepare(fb)
        logits = self.model.forward(fb, self.attn)
        self.stats.forward_tokens += fb.num_tokens
        reused = sum(req.kv_len for req, _ in batch)  # KV the batch read instead of computing
        for req, n in batch:
            req.kv_len += n
        if not is_decode:
            self.stats.prefill_tokens += fb.num_tokens
            for req, _ in batch:
                self._cache_computed(req)
        self._log_batch(batch, is_decode, reused)
        for req, first, count in prompt_spans:
            self._record_prompt_logprobs(req, logits[first : first + count], req.kv_len - count)
        self._sample_and_advance(sampled, logits)

    def _log_batch(self, batch: list[tuple[Req, int]], is_decode: bool, reused: int) -> None:
        """SGLang's batch log lines (operators grep for them), at most one per interval per kind."""
        now = time.monotonic()
        elapsed = now - self._last_log[is_decode]
        if elapsed < self.config.batch_log_interval:
            return
        self._last_log[is_decode] = now
        used = self.pool.size - self.pool.available() - self.cache.evictable_size()
        usage = used / self.pool.size
        if is_decode:
            generated = self.stats.generated_tokens - self._generated_at_last_log
            self._generated_at_last_log = self.stats.generated_tokens
            log.info(f"Decode batch. #running-req: {len(batch)}, #token: {used}, token usage: {usage:.2f}, "
                     f"gen throughput (token/s): {generated / elapsed:.2f}, #queue-req: {len(self.waiting)}")
        else:
            log.info(f"Prefill batch. #new-seq: {len(batch)}, #new-token: {sum(n for _, n in batch)}, "
                     f"#cached-token: {reused}, token usage: {usage:.2f}, "
                     f"#running-req: {len(self.running)}, #queue-req: {len(self.waiting)}")

    def _record_prompt_logprobs(self, req: Req, logits: torch.Tensor, first_pos: int) -> None:
        """Logprob of prompt token p comes from the logits at position p - 1."""
        logprobs = torch.log_softmax(logits, dim=-1)
        prompt = req.origin_input_ids
        start = max(req.logprobs.logprob_start_len, 0)
        if start == 0 and first_pos == 0:
            req.input_token_logprobs.append((None, prompt[0]))
            req.input_top_logprobs.append([])
        for i in range(logprobs.shape[0]):
            p = first_pos + i + 1  # the token these logits predict
            if start <= p < len(prompt):
                req.input_token_logprobs.append((float(logprobs[i, prompt[p]]), prompt[p]))
                req.input_top_logprobs.append(top_logprobs(logprobs[i], req.logprobs.top_logprobs_num))
        if first_pos + logprobs.shape[0] >= len(prompt):
            req.input_logprobs_done = True

    def _sample_and_advance(self, sampled: list[tuple[Req, int]], logits: torch.Tensor) -> None:
        to_sample = [(req, row) for req, row in sampled if len(req.output_ids) < req.params.max_new_tokens]
        if to_sample:
            reqs = [req for req, _ in to_sample]
            rows = torch.tensor([row for _, row in to_sample], dtype=torch.int64, device=logits.device)
            out = sample(logits[rows], reqs, self._grammar_masks(reqs))
            for i, req in enumerate(reqs):
                req.append_token(out.token_ids[i])
                self.stats.generated_tokens += 1
                if req.logprobs.return_logprob:
                    req.output_token_logprobs.append((out.logprobs[i], out.token_ids[i]))
                    req.output_top_logprobs.append(out.top_logprobs[i])
                # Forced tokens mid-sequence are extended from the cache next step: not without a cache.
                if not req.finished and self._jumps_forward(req) and not self.cache.disable:
                    self._jump_forward(req)
        for req, _ in sampled:
            if req.params.max_new_tokens == 0:
                req.finish_reason = FinishReason("length", length=0)  # prefill only: the prompt is now cached
            was_running = req in self.running
            if req.finished:
                if was_running:
                    self.running.remove(req)
                self._finish(req)
                continue
            req.on_output(req.snapshot())
            if len(req.all_ids) - req.kv_len > 1:
                # Forced tokens need their KV computed: back to the queue's head, to extend next step
                # (its KV goes to the cache and is matched again on admission, as after a retraction).
                if was_running:
                    self.running.remove(req)
                self._release(req)
                self.waiting.insert(0, req)
            elif not was_running:
                self.running.append(req)

    def _grammar_masks(self, reqs: list[Req]) -> GrammarMasks | None:
        rows = [i for i, req in enumerate(reqs) if req.grammar is not None]
        if not rows:
            return None
        bitmask = torch.empty(len(rows), self.grammar.words_per_mask, dtype=torch.int32)
        self.grammar.fill_bitmask([reqs[i].grammar for i in rows], bitmask)
        return GrammarMasks(rows, bitmask)

    def _jumps_forward(self, req: Req) -> bool:
        # Forced tokens get no logprobs (no forward pass scores them): a request asking for logprobs samples all.
        return req.grammar is not None and not self.config.disable_jump_forward and not req.logprobs.return_logprob

    def _jump_forward(self, req: Req) -> None:
        """Append the run of tokens the grammar allows as the only continuation (within max_new_tokens)."""
        for token in req.grammar.forced_tokens()[: req.params.max_new_tokens - len(req.output_ids)]:
            req.append_token(token, forced=True)
            self.stats.forced_tokens += 1
            if req.finished:
                return

    # ---- checks ---------------------------------------------------------------------------------

    def active_requests(self) -> list[Req]:
        return self.running + ([self.chunked] if self.chunked else [])

    def check_integrity(self) -> None:
        """free + cached + held-by-running == pool size, with no slot counted twice."""
        self.pool.check()
        self.cache.check_integrity()
        held = [self.table.table[r.row, r.prefix_len : r.kv_len] for r in self.active_requests()]
        parts = [self.pool.free_slots(), self.cache.all_slots(), *held]
        every = torch.cat([p.to(torch.int64).flatten() for p in parts])
        assert every.numel() == self.pool.size, (
            f"free {self.pool.available()} + cached {self.cache.total_size()} + held "
            f"{sum(h.numel() for h in held)} != pool size {self.pool.size}"
        )
        assert torch.unique(every).numel() == every.numel(), "a KV slot is owned twice"
        for r in self.active_requests():  # row[:prefix_len] is the locked path of the cache that ends at last_node
            assert r.last_node is self.cache.root or r.last_node.lock_ref > 0, f"{r.rid}: its cached prefix is unlocked"
            path = self.cache.path_slots(r.last_node)
            assert torch.equal(path, self.table.table[r.row, : r.prefix_len]), f"{r.rid}: row and cache disagree"
        if not self.has_work():
            assert self.cache.protected_size() == 0, "idle but some cache prefix is still locked"
            assert self.table.num_free() == self.config.max_running_requests, "idle but a table row is taken"
