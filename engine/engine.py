"""The offline API: `Engine(config).generate(...)` and `async for out in engine.generate_stream(...)`.

The scheduler runs in its own thread; callers talk to it only through an inbox of typed messages
(below) and get `RequestOutput` snapshots back through callbacks. The HTTP server and the benchmarks
use this same class, so there is one code path. A request is tokenized and validated once, by
`Engine.prepare`; the server calls it before it answers (so errors are 400s) and then `Engine.stream`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Sequence

import structlog
import torch
from transformers import AutoTokenizer

from ..resume import RESUME_FIELD
from .attention import create_attention_backend
from .cpu_kernels import KernelUnavailable, cpu_has
from .grammar import GrammarStats, InvalidGrammar, create_grammar_backend
from .kv_pool import KVLayout, KVPool, ReqToTokenTable
from .models.builtin import resolve_model_path
from .models.config import read_sampling_defaults
from .models.llama import load_model
from .radix_cache import RadixCache
from .request import NO_LOGPROBS, FinishReason, LogprobRequest, Req, RequestOutput
from .sampling_params import SAMPLING_DEFAULT_KEYS, InvalidParamError, SamplingParams
from .scheduler import Scheduler
from .settings import EngineConfig

log = structlog.get_logger(__name__)

Prompt = str | list[int]


@dataclass(frozen=True)
class ValidatedRequest:
    """A prompt tokenized and checked against one engine: what the scheduler thread can run as is.
    Made by `Engine.prepare`, which keeps the invariant: every token id it holds is in the vocabulary,
    and prompt + max_new_tokens fits the context and the KV pool."""

    input_ids: list[int]
    params: SamplingParams
    logprobs: LogprobRequest
    grammar: str | None = None  # params' grammar, compiled by the engine's grammar backend
    # Sample index → output ids generated elsewhere that this request continues from (sglang_gw/resume.py).
    resumed: dict[int, list[int]] = field(default_factory=dict)


# The scheduler thread's inbox: every message is one of these; anything else is a programming error.
@dataclass(frozen=True)
class AddRequest:
    req: Req


@dataclass(frozen=True)
class Abort:
    rid: str


@dataclass(frozen=True)
class AbortAll:
    pass


@dataclass(frozen=True)
class Call:
    """Run fn on the scheduler thread and hand its result to the waiting caller: before the next
    step, or once the scheduler has no work (when_idle)."""

    fn: Callable[[], object]
    result: _Result
    when_idle: bool

    def run(self) -> None:
        self.result.set(self.fn)


Message = AddRequest | Abort | AbortAll | Call


@dataclass(frozen=True)
class Heartbeat:
    """The scheduler thread's last word on its progress, replaced whole (one atomic assignment) so that
    any thread reads a consistent one without a lock: /health answers from it at any load."""

    steps: int  # steps completed since the engine started
    busy: bool  # it had requests to run when it last looked
    at: float  # time.monotonic() of its last progress: work taken up, or a step finished

    def since_progress(self, now: float) -> float:
        """Seconds the scheduler has had work without finishing a step (0 while idle)."""
        return now - self.at if self.busy else 0.0


class Engine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = (config or EngineConfig()).replace(**overrides)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        started = time.perf_counter()
        self.model_path = resolve_model_path(config.model)
        self.device = torch.device(config.device)
        dtype = _resolve_dtype(config.dtype, self.device)
        log.info("engine.loading", model=config.model, path=str(self.model_path), device=str(self.device),
                 dtype=str(dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = load_model(self.model_path, dtype, self.device)
        mc = self.model.config
        self.eos_token_ids = mc.eos_token_ids or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )
        self.context_length = min(config.context_length or mc.max_position, mc.max_position)
        # What a request leaves unset comes from the model's generation_config.json (SGLang's
        # --sampling-defaults model), read once here and applied to every request by `prepare`.
        self.model_sampling_defaults = (read_sampling_defaults(self.model_path)
                                        if config.sampling_defaults == "model" else {})
        unset_request = SamplingParams().with_defaults(self.model_sampling_defaults)
        default_sampling_params = {key: getattr(unset_request, key) for key in SAMPLING_DEFAULT_KEYS}
        log.info("engine.sampling_defaults", source=config.sampling_defaults, **default_sampling_params)

        layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype)
        on_gpu = self.device.type == "cuda"
        weights_bytes = torch.cuda.memory_allocated(self.device) if on_gpu else 0
        self.pool = KVPool(layout, self._pool_tokens(layout), self.device)
        self.table = ReqToTokenTable(config.max_running_requests, self.context_length + 1, self.device)
        self.cache = RadixCache(self.pool, disable=config.disable_radix_cache)
        backend = config.attention_backend
        if backend == "auto":
            backend = "cpu" if self.device.type == "cpu" else "triton"
        try:
            attn = create_attention_backend(backend, self.pool, self.table)
        except KernelUnavailable as exc:  # chosen by auto: the reference still runs, only slower
            if config.attention_backend != "auto":
                raise
            log.warning("engine.attention_fallback", backend="torch", reason=str(exc))
            backend = "torch"
            attn = create_attention_backend(backend, self.pool, self.table)
        self.grammar = create_grammar_backend(config.grammar_backend, self.tokenizer, mc.vocab_size,
                                              self.eos_token_ids)
        reserved = torch.cuda.memory_reserved(self.device) if on_gpu else 0
        step_model, graph_sizes = self._with_decode_graphs(backend, attn)
        if on_gpu:
            self._report_gpu_memory(weights_bytes, graphs_bytes=torch.cuda.memory_reserved(self.device) - reserved)
        self.scheduler = Scheduler(step_model, attn, self.pool, self.table, self.cache, config, self.grammar)
        # The settings as they run, where "auto" or a default was resolved (for /get_server_info).
        self.resolved_settings = {
            "dtype": str(dtype).removeprefix("torch."), "attention_backend": backend,
            "context_length": self.context_length, "max_total_tokens": self.pool.size,
            "max_prefill_tokens": config.prefill_step_tokens, "num_threads": torch.get_num_threads(),
            "cuda_graph_max_bs": max(graph_sizes, default=0),
            "default_sampling_params": default_sampling_params,
        }

        self._inbox: deque[Message] = deque()
        self._idle_calls: list[Call] = []
        # Outputs produced during a step, per caller event loop; only the scheduler thread touches it.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self.error: BaseException | None = None
        self._groups: dict[str, list[str]] = {}  # rid given for n > 1 → its sequences' rids
        self._live: dict[str, Req] = {}  # submitted and not finished, by rid
        self.heartbeat = Heartbeat(steps=0, busy=False, at=time.monotonic())  # written by the scheduler thread only
        self._thread = threading.Thread(target=self._loop, name="sglang-gw-scheduler", daemon=True)
        self._thread.start()
        log.info("engine.ready", seconds=round(time.perf_counter() - started, 2), kv_tokens=self.pool.size,
                 kv_bytes=self.pool.size * layout.bytes_per_token(), context_length=self.context_length)

    def _pool_tokens(self, layout: KVLayout) -> int:
        c = self.config
        if c.max_total_tokens is not None:
            return c.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Weights are loaded already: KV gets what is left of the static fraction of the GPU.
            budget = free - total * (1 - c.mem_fraction_static)
            if budget <= 0:
                raise RuntimeError(f"mem_fraction_static={c.mem_fraction_static} leaves no GPU memory for KV")
        else:
            budget = c.kv_cache_gib * (1 << 30)
        return max(int(budget // layout.bytes_per_token()), 1)

    def _with_decode_graphs(self, backend: str, attn):
        """The model the scheduler steps, behind CUDA graphs for decode where they apply; the graphs' sizes."""
        c = self.config
        # Only triton's decode steps can be captured (the torch backend's shapes follow the sequence lengths).
        if self.device.type != "cuda" or not c.cuda_graph_max_bs or backend != "triton":
            return self.model, []
        from .cuda_graphs import GraphedModel, capture_sizes

        sizes = capture_sizes(min(c.cuda_graph_max_bs, c.max_running_requests))
        return GraphedModel(self.model, attn, sizes), sizes

    def _report_gpu_memory(self, weights_bytes: int, graphs_bytes: int) -> None:
        """What start-up placed on the GPU, for operators sizing mem_fraction_static (the KV pool gets what
        the fraction leaves after the weights; graphs and activations live in the rest)."""
        free, total = torch.cuda.mem_get_info(self.device)
        gib = 1 << 30
        log.info("engine.gpu_memory", total_gib=round(total / gib, 2), weights_gib=round(weights_bytes / gib, 2),
                 kv_pool_gib=round((self.pool.k.nbytes + self.pool.v.nbytes) / gib, 2), kv_tokens=self.pool.size,
                 cuda_graphs_gib=round(graphs_bytes / gib, 2), free_gib=round(free / gib, 2),
                 mem_fraction_static=self.config.mem_fraction_static)

    # ---- the scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self._idle_calls or self.scheduler.has_work() or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        break
                    messages = list(self._inbox)
                    self._inbox.clear()
                for message in messages:
                    match message:
                        case AddRequest(req):
                            self.scheduler.add(req)
                        case Abort(rid):
                            self.scheduler.abort(rid)
                        case AbortAll():
                            self.scheduler.abort_all()
                        case Call(when_idle=True):
                            self._idle_calls.append(message)
                        case Call():
                            message.run()
                        case _:
                            raise TypeError(f"not an engine message: {message!r}")
                steps = self.heartbeat.steps
                if self.scheduler.has_work():
                    if not self.heartbeat.busy:  # work taken up: progress is measured from now
                        self.heartbeat = Heartbeat(steps, busy=True, at=time.monotonic())
                    self.scheduler.step()
                    # Busy as the step leaves it: the loop waits next without another look if it is idle.
                    self.heartbeat = Heartbeat(steps + 1, self.scheduler.has_work(), at=time.monotonic())
                    self._flush_outbox()
                else:
                    self.heartbeat = Heartbeat(steps, busy=False, at=time.monotonic())
                    self._flush_outbox()  # a request may finish on admission (its grammar forced all of it)
                    calls, self._idle_calls = self._idle_calls, []
                    for call in calls:
                        call.run()
        except BaseException as exc:  # a broken step leaves KV state unknown: fail everyone, stop
            self.error = exc
            log.exception("engine.scheduler_failed")
            for req in list(self._live.values()):  # including any caught mid-step in a batch
                if not req.finished:
                    req.finish_reason = FinishReason("abort", message=f"engine error: {exc}")
                    req.on_output(req.snapshot())
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        """One wake-up per event loop per step, however many of its streams got output."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is gone; nobody is listening any more
                pass

    def _send(self, message: Message) -> None:
        if self.error is not None:
            raise RuntimeError(f"engine stopped after an error: {self.error}")
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- requests -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None,
                logprobs: LogprobRequest = NO_LOGPROBS, prompt_field: str = "input_ids",
                grammar_field: str | None = None, resumed: dict[int, list[int]] | None = None) -> ValidatedRequest:
        """Tokenize; reject what cannot run (InvalidParamError naming the field: `grammar_field`, where the
        request's grammar came from another field than its kind, e.g. response_format); clip
        max_new_tokens to what the context and pool allow; compile the grammar. Everything the scheduler
        thread indexes with is checked here, before it gets there. Sampling fields the request left unset
        take the engine's defaults."""
        params = (params or SamplingParams()).with_defaults(self.model_sampling_defaults)
        input_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.model.config.vocab_size
        if not input_ids:
            raise InvalidParamError(prompt_field, "the prompt is empty")
        for field, ids in (("input_ids", input_ids), ("stop_token_ids", params.stop_token_ids),
                           ("logit_bias", params.logit_bias)):
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidParamError(field, f"token ids must be in [0, {vocab})")
        if not 0 <= logprobs.top_logprobs_num <= vocab:
            raise InvalidParamError("top_logprobs_num", f"must be in [0, {vocab}]")
        limit = min(self.context_length, self.pool.size)
        if len(input_ids) >= limit:
            raise InvalidParamError(
                prompt_field, f"the prompt has {len(input_ids)} tokens; this engine's limit is {limit - 1}",
                "context_length_exceeded",
            )
        if len(input_ids) + params.max_new_tokens > limit:
            params = replace(params, max_new_tokens=limit - len(input_ids))
            params = replace(params, min_new_tokens=min(params.min_new_tokens, params.max_new_tokens))
        for sample, ids in (resumed or {}).items():
            if not 0 <= sample < params.n or len(ids) > params.max_new_tokens or any(not 0 <= t < vocab for t in ids):
                raise InvalidParamError(RESUME_FIELD, f"sample {sample}: at most max_new_tokens "
                                                      f"({params.max_new_tokens}) token ids in [0, {vocab})")
        return ValidatedRequest(input_ids, params, logprobs, self._compile(params, grammar_field), dict(resumed or {}))

    def _compile(self, params: SamplingParams, field: str | None) -> str | None:
        spec = params.grammar
        if spec is None:
            return None
        if self.grammar is None:
            raise InvalidParamError(field or spec.kind, "constrained output is off on this engine "
                                                        "(grammar_backend: none)", "unsupported")
        try:
            return self.grammar.compile(spec)
        except InvalidGrammar as exc:
            raise InvalidParamError(field or spec.kind, f"invalid {spec.kind}: {exc}") from None

    def _submit(self, request: ValidatedRequest, on_output: Callable[[RequestOutput], None], *,
                rid: str | None = None, sample_index: int = 0) -> str:
        """Queue one sequence (`stream` splits n > 1 into n of them); returns its rid."""
        rid = rid or uuid.uuid4().hex
        def track(out: RequestOutput) -> None:
            if out.finished:
                self._live.pop(rid, None)
            on_output(out)

        # Each sequence (each of n samples) walks its own copy of the grammar.
        matcher = self.grammar.matcher(request.grammar) if request.grammar is not None else None
        req = Req(rid, request.input_ids, request.params, tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids,
                  on_output=track, logprobs=request.logprobs, sample_index=sample_index, grammar=matcher,
                  resumed=request.resumed.get(sample_index))
        self._live[rid] = req
        self._send(AddRequest(req))
        return rid

    def abort(self, rid: str) -> None:
        """Abort a request by rid; for n > 1, the rid given at submission aborts all n sequences."""
        for seq_rid in self._groups.get(rid, (rid,)):
            self._send(Abort(seq_rid))

    def abort_all(self) -> None:
        self._send(AbortAll())

    @staticmethod
    def _samples(request: ValidatedRequest, rid: str | None) -> list[tuple[str | None, ValidatedRequest]]:
        """n > 1 becomes n sequences with seeds seed, seed+1, …; a sequence's place in the list is its
        sample_index. Their rids are rid-0, rid-1, … (as SGLang names them); without a rid, fresh ones."""
        params = request.params
        if params.n == 1:
            return [(rid, request)]
        base = params.sampling_seed
        # Only n and the seed change, so each sample is as valid as the request.
        return [
            (f"{rid}-{i}" if rid else None,
             replace(request, params=replace(params, n=1, sampling_seed=None if base is None else base + i)))
            for i in range(params.n)
        ]

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kwargs) -> list[RequestOutput]:
        """Blocking batch generation: one final output per sequence (n per prompt, in sample order), in
        prompt order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params_list = _broadcast_params(params, len(prompts))

        async def run_all():
            async def one(p, sp):
                outs = []
                async for out in self.generate_stream(p, sp, **kwargs):
                    if out.finished:
                        outs.append(out)
                return sorted(outs, key=lambda o: o.sample_index)

            results = await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params_list)))
            return [o for group in results for o in group]

        return asyncio.run(run_all())

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None, *, rid: str | None = None,
                        return_logprob: bool = False, logprob_start_len: int = -1,
                        top_logprobs_num: int = 0) -> AsyncIterator[RequestOutput]:
        """`stream` for a prompt (text or token ids); raises InvalidParamError here if it cannot run."""
        logprobs = LogprobRequest(return_logprob, logprob_start_len, top_logprobs_num)
        return self.stream(self.prepare(prompt, params, logprobs), rid=rid)

    async def stream(self, request: ValidatedRequest, *, rid: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields a snapshot after every step that changed a sequence. With n > 1, snapshots of the n
        sequences interleave (tell them apart by sample_index). Leaving the loop early aborts what is left."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:  # runs on the scheduler thread, inside a step
            self._outbox.setdefault(loop, []).append((queue, out))

        samples = self._samples(request, rid)
        if rid is not None and len(samples) > 1:
            self._groups[rid] = [seq_rid for seq_rid, _ in samples]
        prompt_cached = None
        if len(samples) > 1:
            # Prefill the shared prompt once so that every sample reuses its KV from the cache (no
            # logprobs: the samples report those). Generating nothing keeps the request valid.
            prefill_params = replace(request.params, n=1, max_new_tokens=0, min_new_tokens=0)
            prefill_rid = self._submit(replace(request, params=prefill_params, logprobs=NO_LOGPROBS, grammar=None,
                                               resumed={}), deliver)
            while not (out := await queue.get()).finished or out.rid != prefill_rid:
                pass
            prompt_cached = out.cached_tokens  # what the cache really saved this request
        pending: set[str] = set()
        try:
            for sample_index, (seq_rid, sample) in enumerate(samples):
                pending.add(self._submit(sample, deliver, rid=seq_rid, sample_index=sample_index))
            while pending:
                out = await queue.get()
                if out.finished:
                    pending.discard(out.rid)
                yield out if prompt_cached is None else replace(out, cached_tokens=prompt_cached)
        finally:
            for left in pending:
                self.abort(left)
            self._groups.pop(rid, None)

    # ---- introspection (tests, metrics, server info) ---------------------------------------------

    def run_when_idle(self, fn: Callable[[], object], timeout: float = 60.0):
        """Call fn on the scheduler thread once it has no work (e.g. the integrity check); its result."""
        result = _Result()
        self._send(Call(fn, result, when_idle=True))
        return result.get(timeout)

    def run_between_steps(self, fn: Callable[[], object], timeout: float = 60.0):
        """Call fn on the scheduler thread before its next step, busy or not; its result."""
        result = _Result()
        self._send(Call(fn, result, when_idle=False))
        return result.get(timeout)

    def flush_cache(self) -> bool:
        """Empty the radix cache; False (and nothing done) while requests are running or waiting."""
        def flush() -> bool:
            if self.scheduler.has_work():
                return False
            self.cache.reset()
            return True

        return self.run_between_steps(flush)

    def live_stats(self) -> dict:
        """Live figures for /get_server_info and /metrics (read without locking: a snapshot)."""
        s = self.scheduler
        used = self.pool.size - self.pool.available() - self.cache.evictable_size()
        return {
            "num_running_reqs": len(s.active_requests()),
            "num_queue_reqs": len(s.waiting),
            "num_used_tokens": used,
            "max_total_num_tokens": self.pool.size,
            "token_usage": used / self.pool.size,
            "cache_hit_rate": s.stats.cached_tokens / s.stats.prompt_tokens if s.stats.prompt_tokens else 0.0,
            "num_retracted_reqs": s.stats.retractions,
        }

    def grammar_counts(self) -> dict[str, int]:
        """Counters of constrained output: grammars compiled, compiled-grammar cache hits, and output
        tokens the grammars forced (emitted without sampling). Zeros where constrained output is off."""
        g = self.grammar.stats if self.grammar is not None else GrammarStats()
        return {"grammar_compiled": g.compiled, "grammar_cache_hits": g.cache_hits,
                "grammar_forced_tokens": self.scheduler.stats.forced_tokens}

    def check_integrity(self) -> None:
        self.run_when_idle(self.scheduler.check_integrity)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


class _Result:
    """A value (or exception) handed from the scheduler thread to a waiting caller."""

    def __init__(self):
        self._done = threading.Event()
        self._value = self._error = None

    def set(self, fn: Callable[[], object]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc
        self._done.set()

    def get(self, timeout: float):
        if not self._done.wait(timeout):
            raise TimeoutError("the engine did not become idle")
        if self._error is not None:
            raise self._error
        return self._value


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    # AVX512-BF16 or AMX: bf16 dot products in hardware. Without them oneDNN emulates every bf16 product,
    # 2-8x slower than float32 (measured in the issue 10 note).
    if device.type == "cuda" or cpu_has("avx512_bf16") or cpu_has("amx_tile"):
        return torch.bfloat16
    return torch.float32


def _broadcast_params(params, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling params for {count} prompts")
    return params
