"""Scheduler behaviour on a real engine: memory pressure, prefix reuse, abort, prefill-only requests."""

from __future__ import annotations

import asyncio
import random
import re
import time

import pytest
import torch
import torch.nn.functional as F

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang_gw.engine import Engine, SamplingParams
from sglang_gw.engine.request import Req
from sglang_gw.engine.sampling_params import GrammarSpec


def _random_prompts(n: int, seed: int, lo: int = 8, hi: int = 48) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_memory_pressure_retracts_and_still_matches(tiny_models):
    prompts = _random_prompts(20, seed=7)
    params = [SamplingParams(max_new_tokens=40 + 3 * i, temperature=0, ignore_eos=True) for i in range(20)]
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=100_000) as big:
        expected = [o.output_ids for o in big.generate(prompts, params)]
    # ~4 requests' worth of KV for 20 concurrent ones; admission is optimistic, so decode runs out.
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=360, chunked_prefill_size=64) as small:
        outs = small.generate(prompts, params)
        assert [o.output_ids for o in outs] == expected
        assert all(o.finish_reason.type == "length" for o in outs)
        assert small.scheduler.stats.retractions > 0
        small.check_integrity()


def test_shared_512_prefix_computes_only_new_tokens(tiny_models):
    rng = random.Random(3)
    prefix = [rng.randrange(3, 500) for _ in range(512)]
    first, second = prefix + [10, 11, 12], prefix + [20, 21, 22, 23]
    params = SamplingParams(max_new_tokens=1, temperature=0)
    with Engine(model=str(tiny_models["qwen3"]), max_total_tokens=4096, chunked_prefill_size=128) as engine:
        engine.generate(first, params)
        before = engine.scheduler.stats.forward_tokens
        out = engine.generate(second, params)[0]
        computed = engine.scheduler.stats.forward_tokens - before
        assert out.cached_tokens >= 511
        assert computed == len(second) - out.cached_tokens == 4
        engine.check_integrity()


def test_prefill_only_request_caches_the_prompt(tiny_models):
    prompt = _random_prompts(1, seed=9, lo=100, hi=100)[0]
    with Engine(model=str(tiny_models["qwen2"]), max_total_tokens=4096) as engine:
        warm = engine.generate(prompt, SamplingParams(max_new_tokens=0))[0]
        assert warm.output_ids == [] and warm.finish_reason.type == "length"
        out = engine.generate(prompt + [42], SamplingParams(max_new_tokens=4, temperature=0))[0]
        assert out.cached_tokens == len(prompt)
        engine.check_integrity()


async def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def test_abort_during_prefill_frees_everything(tiny_models):
    prompt = _random_prompts(1, seed=11, lo=1500, hi=1500)[0]
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=4096, chunked_prefill_size=16) as engine:
        sched = engine.scheduler

        async def run():
            outs = []
            agen = engine.generate_stream(prompt, SamplingParams(max_new_tokens=8), rid="long")
            task = asyncio.ensure_future(_collect(agen, outs))
            await _wait_for(lambda: sched.chunked is not None and sched.chunked.kv_len >= 64)
            engine.abort("long")
            await task
            return outs

        outs = asyncio.run(run())
        assert outs[-1].finished and outs[-1].finish_reason.type == "abort"
        assert outs[-1].output_ids == []
        assert sched.stats.aborted == 1
        engine.check_integrity()
        assert engine.pool.available() + engine.cache.total_size() == engine.pool.size
        assert engine.cache.protected_size() == 0


def test_abort_during_decode_frees_everything(tiny_models):
    prompts = _random_prompts(3, seed=12)
    with Engine(model=str(tiny_models["qwen2"]), max_total_tokens=4096) as engine:

        async def run():
            # The caller walks away after a few tokens: leaving the stream aborts the request.
            got = 0
            async for out in engine.generate_stream(prompts[0], SamplingParams(max_new_tokens=500, ignore_eos=True)):
                got = len(out.output_ids)
                if got >= 3:
                    break
            others = [engine.generate_stream(p, SamplingParams(max_new_tokens=5)) for p in prompts[1:]]
            return got, [await _last(o) for o in others]

        got, others = asyncio.run(run())
        assert got == 3
        assert all(o.finished and o.finish_reason.type != "abort" for o in others)
        engine.check_integrity()
        assert engine.scheduler.stats.aborted == 1
        assert engine.cache.protected_size() == 0


def test_lpm_policy_generates_the_same(tiny_models):
    prompts = _random_prompts(6, seed=13)
    prompts += [prompts[0] + [1, 2, 3], prompts[1] + [4, 5]]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with Engine(model=str(tiny_models["qwen3"]), max_total_tokens=4096) as fcfs:
        expected = [o.output_ids for o in fcfs.generate(prompts, params)]
    with Engine(model=str(tiny_models["qwen3"]), max_total_tokens=4096, schedule_policy="lpm",
                max_running_requests=2) as lpm:
        assert [o.output_ids for o in lpm.generate(prompts, params)] == expected
        lpm.check_integrity()


def test_prompt_longer_than_the_pool_is_rejected(tiny_models):
    from sglang_gw.engine import InvalidParamError

    with Engine(model=str(tiny_models["llama"]), max_total_tokens=64) as engine:
        with pytest.raises(InvalidParamError) as err:
            engine.generate(list(range(3, 100)), SamplingParams(max_new_tokens=4))
        assert (err.value.param, err.value.code) == ("input_ids", "context_length_exceeded")
        # The engine still serves others; max_new_tokens is clipped to what the pool can hold.
        out = engine.generate(list(range(3, 40)), SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
        assert len(out.output_ids) == 64 - 37


def test_an_unknown_inbox_message_stops_the_engine_loudly(tiny_models):
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=256) as engine:
        engine._send(("call_idle", None))  # the old string-tagged form: a programming error, not an idle call
        engine._thread.join(timeout=30)
        assert isinstance(engine.error, TypeError)
        with pytest.raises(RuntimeError, match="engine stopped"):
            engine.generate([5, 6], SamplingParams(max_new_tokens=1))


async def _collect(agen, outs):
    async for out in agen:
        outs.append(out)


async def _last(agen):
    out = None
    async for out in agen:
        pass
    return out


def test_paged_decode_kernel_matches_reference_while_the_batch_shrinks(tiny_models):
    # 30 requests decode together and finish at different steps; half share a prefix (shared slots).
    prefix = _random_prompts(1, seed=20, lo=40, hi=40)[0]
    prompts = [(prefix if i % 2 else []) + p for i, p in enumerate(_random_prompts(30, seed=21))]
    params = [SamplingParams(max_new_tokens=60 if i >= 27 else 3 + i % 5, temperature=0, ignore_eos=True)
              for i in range(30)]
    outputs = {}
    for backend in ("torch", "cpu"):
        # float32: at bfloat16 (`auto` on a bf16-capable CPU) the two backends' rounding parts greedy ties.
        with Engine(model=str(tiny_models["llama"]), max_total_tokens=8192, attention_backend=backend,
                    dtype="float32") as engine:
            outputs[backend] = [o.output_ids for o in engine.generate(prompts, params)]
            engine.check_integrity()
    assert outputs["cpu"] == outputs["torch"]


def test_paged_decode_kernel_equals_sdpa_for_every_dtype():
    from sglang_gw.engine import cpu_kernels

    kernel = cpu_kernels.load("decode_attention")
    gen = torch.Generator().manual_seed(0)
    pool_k, pool_v = (torch.randn(500, 2, 16, generator=gen) for _ in range(2))
    q = torch.randn(3, 6, 16, generator=gen)  # 3 requests, 6 query heads over 2 kv heads
    lens = torch.tensor([1, 37, 120])
    slots = torch.randint(1, 500, (3, 120), generator=gen)
    slots[1, :37] = slots[2, :37]  # a shared prefix
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        out = kernel.decode_attention(q.to(dtype), pool_k.to(dtype), pool_v.to(dtype), slots, lens, 16 ** -0.5)
        for b, n in enumerate(lens.tolist()):
            keys, values = (p[slots[b, :n]].transpose(0, 1)[None].to(dtype).float() for p in (pool_k, pool_v))
            ref = F.scaled_dot_product_attention(q[b].to(dtype).float()[None, :, None], keys, values, enable_gqa=True)
            torch.testing.assert_close(out[b].float(), ref[0, :, 0], atol=tolerance, rtol=tolerance)


def _drive_by_hand(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]],
                   finals: dict | None = None) -> list[str]:
    """Queue requests on a stopped engine's scheduler and step it on this thread; rids in finish order
    (and each final output in `finals`, by rid)."""
    sched, finished = engine.scheduler, []
    finals = {} if finals is None else finals

    def record(out):
        if out.finished:
            finished.append(out.rid)
            finals[out.rid] = out

    for rid, prompt, params in requests:
        sched.add(Req(rid, prompt, params, tokenizer=engine.tokenizer, eos_token_ids=(), on_output=record))
    while sched.has_work():
        sched.step()
        assert len(sched.active_requests()) <= sched.config.max_running_requests
    sched.check_integrity()
    return finished


@pytest.mark.parametrize("policy, expected", [("fcfs", ["fresh", "cached"]), ("lpm", ["cached", "fresh"])])
def test_schedule_policy_orders_admission(tiny_models, policy, expected):
    cached, fresh = _random_prompts(2, seed=31, lo=60, hi=60)
    with Engine(model=str(tiny_models["qwen2"]), max_total_tokens=4096, schedule_policy=policy,
                max_running_requests=1) as engine:
        engine.generate(cached, SamplingParams(max_new_tokens=0))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    order = _drive_by_hand(engine, [("fresh", fresh, params), ("cached", cached + [1, 2], params)])
    assert order == expected


def test_max_running_requests_caps_the_batch(tiny_models):
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=4096, max_running_requests=3) as engine:
        pass
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    requests = [(str(i), p, params) for i, p in enumerate(_random_prompts(8, seed=33))]
    assert sorted(_drive_by_hand(engine, requests)) == sorted(r[0] for r in requests)


def test_prefill_steps_fill_max_prefill_tokens_with_chunks_of_chunked_prefill_size(tiny_models):
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=4096, chunked_prefill_size=16,
                max_prefill_tokens=48) as engine:
        pass
    steps = []  # tokens per prefill step
    run_batch = engine.scheduler._run_batch

    def recording(batch, is_decode):
        if not is_decode:
            steps.append([n for _, n in batch])
        run_batch(batch, is_decode)

    engine.scheduler._run_batch = recording
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    short = [(f"s{i}", p, params) for i, p in enumerate(_random_prompts(5, seed=35, lo=12, hi=12))]
    _drive_by_hand(engine, short)
    assert steps[:2] == [[12, 12, 12, 12], [12]]  # several requests share one step, up to 48 tokens
    steps.clear()
    _drive_by_hand(engine, [("long", _random_prompts(1, seed=36, lo=40, hi=40)[0], params)])
    assert steps == [[16], [16], [8]]  # one request's chunks stay within chunked_prefill_size


# ---- sharing while requests run ----


def test_concurrent_requests_compute_a_shared_prefix_once(tiny_models):
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=8192) as engine:
        pass
    rng = random.Random(41)
    prefix = [rng.randrange(3, 500) for _ in range(1000)]
    suffixes = _random_prompts(16, seed=42, lo=5, hi=40)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    finals = {}
    _drive_by_hand(engine, [(str(i), prefix + s, params) for i, s in enumerate(suffixes)], finals)
    stats = engine.scheduler.stats
    assert stats.prefill_tokens <= 1.05 * (len(prefix) + sum(map(len, suffixes)))
    assert sorted(o.cached_tokens >= len(prefix) for o in finals.values()) == [False] + [True] * 15
    assert stats.held_back >= 15


def test_a_request_admitted_while_another_decodes_reuses_its_prompt(tiny_models):
    with Engine(model=str(tiny_models["qwen3"]), max_total_tokens=8192) as engine:
        pass
    sched = engine.scheduler
    prefix = _random_prompts(1, seed=43, lo=300, hi=300)[0]
    outputs = {}
    params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    for rid, prompt in (("first", prefix + [7, 8]), ("second", prefix + [9])):
        sched.add(Req(rid, prompt, params, tokenizer=engine.tokenizer, eos_token_ids=(),
                      on_output=lambda out: outputs.__setitem__(out.rid, out)))
        sched.step()
        if rid == "first":
            sched.step()  # first now decodes, with 50 tokens still to go
            assert [r.rid for r in sched.running] == ["first"] and not outputs["first"].finished
    assert outputs["second"].cached_tokens >= len(prefix)
    sched.check_integrity()


# Constrained requests in the state machine: forced runs (jump-forward requeues mid-sequence) between
# sampled parts, so grammar state meets retraction, abort and re-admission.
MACHINE_GRAMMAR = r'\{"answer": "(yes|no)", "count": [0-9]{1,3}, "note": "[a-z ]{0,8}"\}'


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of admission, prefill chunks, decode steps, finishing, aborts and retraction
    on a real engine with a small pool, short chunks and prompts built from a few shared prefixes, some
    constrained by a grammar; the scheduler's integrity check (memory invariant, locks, rows vs cache)
    must hold after every rule, and every constrained output that completes must match its grammar."""

    engine: Engine  # one per test run, set below: loading a model per example would dominate
    grammar_completed = 0  # over all examples: constrained outputs checked against their grammar

    def __init__(self):
        super().__init__()
        self.sched = self.engine.scheduler
        assert not self.sched.has_work(), "the previous run's teardown left work behind"
        self.engine.cache.reset()
        self.prefixes = _random_prompts(3, seed=44, lo=20, hi=60)
        self.count = 0
        self.finished: set[str] = set()
        self.constrained: set[str] = set()

    def _track(self, out):
        if out.finished:
            assert out.rid not in self.finished, "a request finished twice"
            self.finished.add(out.rid)
            if out.rid in self.constrained and out.finish_reason.type == "stop":
                assert re.fullmatch(MACHINE_GRAMMAR, out.text), out.text
                SchedulerMachine.grammar_completed += 1

    @rule(prefix=st.integers(0, 3), tail=st.lists(st.integers(3, 500), min_size=1, max_size=30),
          max_new=st.integers(0, 12), constrained=st.booleans())
    def add(self, prefix, tail, max_new, constrained):
        self.count += 1
        prompt = (self.prefixes[prefix] if prefix < 3 else []) + tail
        grammar = None
        if constrained:
            max_new *= 4  # room for the grammar to complete
            grammar = self.engine.grammar.matcher(self.engine.grammar.compile(GrammarSpec("regex", MACHINE_GRAMMAR)))
            self.constrained.add(str(self.count))
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0, sampling_seed=self.count, ignore_eos=True)
        self.sched.add(Req(str(self.count), prompt, params, tokenizer=self.engine.tokenizer, eos_token_ids=(),
                           on_output=self._track, grammar=grammar))

    @precondition(lambda self: self.sched.has_work())
    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            if self.sched.has_work():
                self.sched.step()

    @precondition(lambda self: self.sched.waiting or self.sched.active_requests())
    @rule(pick=st.integers(0, 1000))
    def abort(self, pick):
        reqs = self.sched.waiting + self.sched.active_requests()
        self.sched.abort(reqs[pick % len(reqs)].rid)

    @precondition(lambda self: self.sched.running)
    @rule()
    def retract(self):
        self.sched._retract_one()

    @invariant()
    def integrity(self):
        self.sched.check_integrity()

    def teardown(self):
        while self.sched.has_work():
            self.sched.step()
        self.sched.check_integrity()
        assert self.finished == {str(i) for i in range(1, self.count + 1)}, "a request never finished"


def test_scheduler_integrity_under_random_interleavings(tiny_models):
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=300, chunked_prefill_size=24,
                max_prefill_tokens=48, max_running_requests=6) as engine:
        pass
    SchedulerMachine.engine = engine
    SchedulerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    SchedulerMachine.TestCase().runTest()
    assert SchedulerMachine.grammar_completed > 0 and engine.scheduler.stats.forced_tokens > 0


def test_auto_falls_back_to_the_reference_when_the_kernel_cannot_be_built(tiny_models, monkeypatch):
    from sglang_gw.engine import attention, cpu_kernels

    def no_compiler(name):
        raise cpu_kernels.KernelUnavailable("no C++ compiler")

    monkeypatch.setattr(attention.cpu_kernels, "load", no_compiler)
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=1024) as engine:
        assert engine.resolved_settings["attention_backend"] == "torch"
        assert len(engine.generate([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0))[0].output_ids) == 3
    with pytest.raises(cpu_kernels.KernelUnavailable, match="no C.. compiler"):
        Engine(model=str(tiny_models["llama"]), max_total_tokens=1024, attention_backend="cpu")


@pytest.mark.parametrize("features, expected", [((), torch.float32), (("avx512_bf16",), torch.bfloat16),
                                                (("amx_tile",), torch.bfloat16)])
def test_dtype_auto_is_bfloat16_only_where_the_cpu_has_bf16_dot_products(monkeypatch, features, expected):
    from sglang_gw.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_has", lambda feature: feature in features)
    assert engine_module._resolve_dtype("auto", torch.device("cpu")) == expected
    assert engine_module._resolve_dtype("float32", torch.device("cpu")) == torch.float32
