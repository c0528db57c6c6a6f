"""One engine process over HTTP: SGLang's native API and the OpenAI API (aiohttp + uvloop).

The scheduler runs in the engine's own thread; handlers only await its outputs, so the event loop
never blocks on the model. Lifecycle: listen at once (health answers 503) → load the model in a
thread → warm up with a 1-token generation → ready. SIGTERM: stop admitting (503), let in-flight
requests finish within the grace period, exit 0.

Every generation request goes the same way: parse (bounded by sglang_gw/limits.py) → admit its sequences
(ready? room for prompts × n?) → tokenize and validate with engine.prepare in a worker thread (400s
before any byte is sent) → engine.stream → shape the outputs (JSON or SSE).
A client that goes away cancels the handler, which aborts its requests in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import AsyncIterator

import structlog
from aiohttp import web

from ..serving import listening, presented_key
from ..errors import APIError, bad_request, error_middleware, read_json
from ..limits import MAX_COUNT, MAX_SEQUENCES
from ..resume import CHECKPOINT_INTERVAL, RESUMABLE_HEADER, USAGE, OutputIds
from .engine import Engine, Prompt, ValidatedRequest
from .metrics import EngineMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, parse, sampling_params
from .detokenizer import token_bytes, token_label
from .request import LogprobRequest, RequestOutput
from .sampling_params import InvalidParamError, SamplingParams
from .settings import EngineArgs
from .tool_calls import ForcedToolCalls, new_call_id

log = structlog.get_logger(__name__)

# Paths served without an API key: probes and scrapers must not need the users' secret.
OPEN_PATHS = {"/health", "/health_generate", "/metrics"}
HEALTH_GENERATE_TIMEOUT = 20.0


class EngineServer:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.served_model_name = args.served_model_name or args.model
        self.engine: Engine | None = None
        self.state = "loading"  # loading → ready → draining
        self.inflight = 0  # generation requests admitted and not answered yet
        self.sequences = 0  # the sequences they expand to (prompts × n): what admission counts
        self.idle = asyncio.Event()
        self.idle.set()
        self.metrics = EngineMetrics(self)
        errors = error_middleware(args.max_request_bytes,
                                  lambda: 503 if self.engine is not None and self.engine.error else 500)
        self.app = web.Application(client_max_size=args.max_request_bytes, middlewares=[errors, self._auth])
        r = self.app.router
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        for path in ("/get_model_info", "/model_info"):  # SGLang serves both names
            r.add_get(path, self.model_info)
        for path in ("/get_server_info", "/server_info"):
            r.add_get(path, self.server_info)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/v1/models", self.models)
        r.add_post("/generate", self.generate)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/abort_request", self.abort_request)

    # ---- lifecycle --------------------------------------------------------------------------------

    async def load(self) -> None:
        self.engine = await asyncio.to_thread(Engine, self.args)
        warmup = SamplingParams(max_new_tokens=1, temperature=0)
        async for _ in self.engine.generate_stream("warm up", warmup):
            pass
        self.state = "ready"
        log.info("server.ready", model=self.served_model_name, host=self.args.host, port=self.args.port)

    async def drain(self) -> None:
        self.state = "draining"
        log.info("server.draining", inflight=self.inflight, grace_s=self.args.graceful_shutdown_timeout)
        try:
            await asyncio.wait_for(self.idle.wait(), self.args.graceful_shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("server.grace_period_over", aborting=self.inflight)
            if self.engine is not None:
                self.engine.abort_all()
            await asyncio.sleep(0.5)  # let the handlers write their aborted responses

    @contextlib.contextmanager
    def _admitted(self, params: list[SamplingParams], batch_field: str):
        """A generation request's share of the engine: its sequences (one per prompt and sample; `params`
        holds each prompt's), counted against the running + queued capacity, which one request may not
        exceed (400, naming n or the batch field). Refuses while not ready or when the queue is too full."""
        if self.state != "ready":
            raise APIError(503, f"the server is {self.state}", code="unavailable", headers={"Retry-After": "5"})
        sequences = sum(p.n for p in params)
        capacity = self.args.max_running_requests + self.args.max_queued_requests
        most = min(MAX_SEQUENCES, capacity)
        if sequences > most:
            raise bad_request(f"the request expands to {sequences} sequences (prompts × n); this engine takes at "
                              f"most {most} in one request", "n" if any(p.n > 1 for p in params) else batch_field,
                              "too_many_sequences")
        if self.sequences + sequences > capacity:
            raise APIError(503, f"too many sequences in flight (limit {capacity}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        self.inflight += 1
        self.sequences += sequences
        self.idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            self.sequences -= sequences
            if self.inflight == 0:
                self.idle.set()

    # ---- middlewares ------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        key = self.args.api_key
        if key and request.path not in OPEN_PATHS:
            given = presented_key(request)
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    # ---- helpers ----------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"model {model!r} is not served here; available: {self.served_model_name!r}",
                           param="model", code="model_not_found")

    async def _prepare(self, items: list[tuple[Prompt, SamplingParams, LogprobRequest, dict[int, list[int]]]],
                       field: str, grammar_field: str | None = None) -> list[ValidatedRequest]:
        """Tokenize, validate and compile the grammars before any response byte is sent, so errors are 400s.
        In a thread: tokenizing a batch of long prompts or compiling a grammar must not stall the event
        loop (health probes, other requests' streams). Each item: prompt, params, logprobs, and the output
        ids per sample that it continues from (sglang_gw/resume.py)."""
        def prepare_all() -> list[ValidatedRequest]:
            return [self.engine.prepare(prompt, params, logprobs, prompt_field=field, grammar_field=grammar_field,
                                        resumed=resumed)
                    for prompt, params, logprobs, resumed in items]

        try:
            return await asyncio.to_thread(prepare_all)
        except InvalidParamError as exc:
            raise bad_request(str(exc), exc.param, exc.code) from None

    async def _run(self, jobs: list[tuple[ValidatedRequest, str]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several (request, rid) jobs at once; yields (job index, snapshot). Leaving early aborts the rest."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request: ValidatedRequest, rid: str):
            try:
                async for out in self.engine.stream(request, rid=rid):
                    await queue.put((index, out))
                    if out.finished:
                        self.metrics.observe(out)
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, *job)) for i, job in enumerate(jobs)]
        try:
            running = len(tasks)
            while running:
                index, out = await queue.get()
                if out is None:
                    running -= 1
                else:
                    yield index, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _event_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def _sse(self, request: web.Request, events: AsyncIterator[tuple[dict, tuple[int, RequestOutput] | None]],
                   resumable: bool) -> web.StreamResponse:
        """Write (event, (choice index, output) or None for the usage chunk) pairs as SSE; when `resumable`,
        each event is annotated with its choice's output ids (sglang_gw/resume.py)."""
        ids = OutputIds() if resumable else None
        resp = await self._event_stream(request)
        async with contextlib.aclosing(events):  # a failed write (client gone) aborts the requests now
            async for event, source in events:
                head = b""
                if ids is not None:
                    head = USAGE if source is None else ids.line(source[0], source[1].output_ids, source[1].finished)
                await resp.write(head + b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _finals(self, request: web.Request, jobs, choice_index, resumable: bool
                      ) -> tuple[dict[int, tuple[int, RequestOutput]], web.StreamResponse | None]:
        """A non-streamed request's final outputs, by choice index. When `resumable`, one that runs past
        CHECKPOINT_INTERVAL answers as an event stream of checkpoints (the output ids so far), which
        `_answer` ends with the JSON: another engine can continue it from there (sglang_gw/resume.py)."""
        finals: dict[int, tuple[int, RequestOutput]] = {}
        ids = OutputIds() if resumable else None
        moved: dict[int, list[int]] = {}  # choices that moved since the last checkpoint
        resp, due = None, time.monotonic() + CHECKPOINT_INTERVAL
        async with contextlib.aclosing(self._run(jobs)) as outputs:
            async for job, out in outputs:
                index = choice_index(job, out)
                if out.finished:
                    finals[index] = (job, out)
                if ids is None:
                    continue
                moved[index] = out.output_ids
                if time.monotonic() >= due:
                    resp = resp or await self._event_stream(request)
                    await resp.write(b"".join(ids.line(i, output_ids) for i, output_ids in moved.items()) + b"\n")
                    moved.clear()
                    due = time.monotonic() + CHECKPOINT_INTERVAL
        return finals, resp

    @staticmethod
    async def _answer(request: web.Request, body: object, checkpoints: web.StreamResponse | None
                      ) -> web.StreamResponse:
        """The JSON answer: as is, or as the one data event after `_finals`' checkpoints."""
        if checkpoints is None:
            return web.json_response(body)
        await checkpoints.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        await checkpoints.write_eof()
        return checkpoints

    # ---- native endpoints -------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 while serving, with the scheduler's heartbeat so that a prober can tell busy from hung (it
        is read, not computed: as cheap under load as idle); 503 while loading, draining or broken. With
        `?max_since_progress=S` also 503 ("stuck") when the scheduler has had work and finished no step
        for S seconds: a liveness probe that cannot read JSON (Kubernetes) sees a hang, never load."""
        if self.engine is not None and self.engine.error is not None:
            return web.json_response({"status": "unhealthy", "reason": str(self.engine.error)}, status=503)
        if self.state != "ready":
            return web.json_response({"status": self.state}, status=503)
        beat = self.engine.heartbeat
        since = beat.since_progress(time.monotonic())
        body = {"status": "ok", "steps": beat.steps, "busy": beat.busy, "since_progress_s": round(since, 3)}
        limit = request.query.get("max_since_progress")
        if limit is not None:
            try:
                limit_s = float(limit)
            except ValueError:
                raise bad_request("max_since_progress must be a number of seconds", "max_since_progress") from None
            if beat.busy and since > limit_s:
                return web.json_response(dict(body, status="stuck"), status=503)
        return web.json_response(body)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.state != "ready":
            return web.json_response({"status": self.state}, status=503)

        async def one_token():
            async for out in self.engine.generate_stream([0], SamplingParams(max_new_tokens=1, temperature=0)):
                if out.finished:
                    return out

        try:
            await asyncio.wait_for(one_token(), HEALTH_GENERATE_TIMEOUT)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            return web.json_response({"status": "unhealthy", "reason": str(exc) or "timeout"}, status=503)
        return web.json_response({"status": "ok"})

    async def model_info(self, request: web.Request) -> web.Response:
        self._require_loaded()
        return web.json_response({
            "model_path": str(self.engine.model_path), "tokenizer_path": str(self.engine.model_path),
            "served_model_name": self.served_model_name, "is_generation": True,
            "context_length": self.engine.context_length,
        })

    async def server_info(self, request: web.Request) -> web.Response:
        """The settings in effect (resolved where they were "auto" or left to a default) and live load."""
        self._require_loaded()
        return web.json_response({
            **self.args.model_dump(exclude={"api_key"}), **self.engine.resolved_settings,
            "model_path": self.args.model, "served_model_name": self.served_model_name,
            "state": self.state, "inflight_requests": self.inflight, **self.engine.live_stats(),
            **self.engine.grammar_counts(),
        })

    def _require_loaded(self) -> None:
        if self.engine is None:
            raise APIError(503, "the model is still loading", code="unavailable", headers={"Retry-After": "5"})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def flush_cache(self, request: web.Request) -> web.Response:
        self._require_loaded()
        if self.inflight or not await asyncio.to_thread(self.engine.flush_cache):
            raise APIError(400, "cannot flush the cache while requests are running or waiting", code="busy")
        return web.json_response({"success": True, "message": "Cache flushed."})

    async def abort_request(self, request: web.Request) -> web.Response:
        self._require_loaded()
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("rid", ""), str):
            raise bad_request("expected {\"rid\": str, \"abort_all\": bool}", "rid")
        if body.get("abort_all"):
            self.engine.abort_all()
        elif body.get("rid"):
            self.engine.abort(body["rid"])
        else:
            raise bad_request("give rid or abort_all", "rid")
        return web.json_response({"success": True})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        req = parse(GenerateRequest, await read_json(request))
        prompts = req.prompts()
        count = len(prompts)
        rids = req.per_item("rid", count) if req.rid is not None else [uuid.uuid4().hex for _ in prompts]
        params = [sampling_params(sp) for sp in req.per_item("sampling_params", count)]
        logprobs = [LogprobRequest(return_logprob=lp, logprob_start_len=start, top_logprobs_num=top)
                    for lp, start, top in zip(req.per_item("return_logprob", count),
                                              req.per_item("logprob_start_len", count),
                                              req.per_item("top_logprobs_num", count))]
        with self._admitted(params, req.prompt_field):
            resumed = req.resumed([p.n for p in params])
            prepared = await self._prepare(list(zip(prompts, params, logprobs, resumed)), req.prompt_field)
            jobs = list(zip(prepared, rids))
            with_text = req.return_text_in_logprobs
            offsets = [sum(p.n for p in params[:i]) for i in range(count)]  # each prompt's first choice index
            as_list = req.is_batch or offsets[-1] + params[-1].n > 1

            def native(i: int, out: RequestOutput) -> dict:
                return self._native(out, jobs[i][0].logprobs.return_logprob, with_text)

            def choice_index(i: int, out: RequestOutput) -> int:
                return offsets[i] + out.sample_index

            async def events():
                async for i, out in self._run(jobs):
                    if out.replayed and not out.finished:
                        continue  # a resumed sequence's starting point: its caller has it
                    event = native(i, out)
                    yield dict(event, index=i) if as_list else event, (choice_index(i, out), out)

            resumable = self._resumable(request, any(lp.return_logprob for lp in logprobs))
            if req.stream:
                return await self._sse(request, events(), resumable)
            finals, checkpoints = await self._finals(request, jobs, choice_index, resumable)
            results = [native(i, out) for _, (i, out) in sorted(finals.items())]
            return await self._answer(request, results if as_list else results[0], checkpoints)

    @staticmethod
    def _resumable(request: web.Request, whole_logprobs: bool) -> bool:
        """Whether to tell the gateway the ids behind the answer (sglang_gw/resume.py): when it asks, and
        unless the answer holds every token's logprob (non-streamed, or /generate's cumulative events),
        which a continuation could not give for the tokens it did not generate."""
        return RESUMABLE_HEADER in request.headers and not whole_logprobs

    def _native(self, out: RequestOutput, return_logprob: bool, with_text: bool) -> dict:
        meta = {
            "id": out.rid, "finish_reason": out.finish_reason.to_json() if out.finish_reason else None,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens, "e2e_latency": out.e2e_latency,
        }
        if return_logprob:
            text = self._token_text if with_text else (lambda _: None)
            meta["input_token_logprobs"] = [[lp, t, text(t)] for lp, t in out.input_token_logprobs]
            meta["output_token_logprobs"] = [[lp, t, text(t)] for lp, t in out.output_token_logprobs]
            meta["input_top_logprobs"] = [[[lp, t, text(t)] for t, lp in top] for top in out.input_top_logprobs]
            meta["output_top_logprobs"] = [[[lp, t, text(t)] for t, lp in top] for top in out.output_top_logprobs]
        return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}

    def _token_text(self, token_id: int) -> str:
        return token_label(self.engine.tokenizer, token_id)

    # ---- OpenAI endpoints -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        self._require_loaded()
        return web.json_response({"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "sglang-gw",
            "root": str(self.engine.model_path), "max_model_len": self.engine.context_length,
        }]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse(CompletionRequest, await read_json(request))
        self._check_model(req.model)
        if req.echo:
            raise bad_request("echo is not supported", "echo", "unsupported")
        prompts = req.prompts()
        grammar, grammar_field = req.grammar()
        params = sampling_params(req.sampling_dict(req.max_tokens, grammar))
        with self._admitted([params] * len(prompts), "prompt"):
            return await self._openai(request, req, prompts, params, top=req.logprobs, chat=False,
                                      grammar_field=grammar_field)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse(ChatCompletionRequest, await read_json(request))
        self._check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        tools = req.forced_tool_calls()
        grammar, grammar_field = ({"json_schema": json.dumps(tools.schema())}, "tools") if tools else req.grammar()
        # No limit given: up to the context, which engine.prepare clips to.
        params = sampling_params(req.sampling_dict(max_tokens if max_tokens is not None else MAX_COUNT, grammar))
        messages = [m.for_template() for m in req.messages]
        declared = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        with self._admitted([params], "messages"):
            # In a thread, as _prepare: rendering and tokenizing a long conversation takes a while.
            prompt = await asyncio.to_thread(self._chat_prompt, messages, declared)
            top = (req.top_logprobs or 0) if req.logprobs else None
            return await self._openai(request, req, [prompt], params, top=top, chat=True, grammar_field=grammar_field,
                                      tools=tools)

    def _chat_prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """The conversation rendered with the model's chat template, as token ids."""
        try:  # templates that know tools show them to the model; the others ignore them
            text = self.engine.apply_chat_template(messages, tools=tools)
        except Exception as exc:  # the template itself may refuse a conversation (e.g. role order)
            raise bad_request(f"chat template failed: {exc}", "messages") from None
        # The rendered template already holds its special tokens (BOS included, where it has one).
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    async def _openai(self, request, req, prompts, params: SamplingParams, top: int | None, chat: bool,
                      grammar_field: str | None, tools: ForcedToolCalls | None = None):
        """Both OpenAI endpoints: one job per prompt; choice index = prompt index * n + sample index."""
        base = req.rid or uuid.uuid4().hex
        logprobs = LogprobRequest(return_logprob=top is not None, top_logprobs_num=top or 0)
        resumed = req.resumed([params.n] * len(prompts))
        prepared = await self._prepare([(p, params, logprobs, r) for p, r in zip(prompts, resumed)],
                                       "messages" if chat else "prompt", grammar_field)
        jobs = [(job, f"{base}-{i}") for i, job in enumerate(prepared)]
        object_id = ("chatcmpl-" if chat else "cmpl-") + base
        created = int(time.time())

        def choice_index(job: int, out: RequestOutput) -> int:
            return job * params.n + out.sample_index

        if req.stream:  # a delta's logprobs are its new tokens': a continuation gives them
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._sse(request, self._openai_stream(jobs, chat, object_id, created, choice_index,
                                                                logprobs.return_logprob, include_usage, tools),
                                   self._resumable(request, whole_logprobs=False))
        finals, checkpoints = await self._finals(request, jobs, choice_index,
                                                 self._resumable(request, logprobs.return_logprob))
        choices = []
        for index in sorted(finals):
            job, out = finals[index]
            choice = {"index": index, "finish_reason": _finish(out)}
            if chat:
                calls = _tool_calls(tools, out)
                choice["message"] = ({"role": "assistant", "content": None, "tool_calls": calls} if calls
                                     else {"role": "assistant", "content": out.text})
                if calls:
                    choice["finish_reason"] = "tool_calls"
                choice["logprobs"] = self._chat_logprobs(out, 0) if top is not None else None
            else:
                choice["text"] = out.text
                choice["logprobs"] = self._completion_logprobs(out, 0) if top is not None else None
            choices.append(choice)
        return await self._answer(request, {
            "id": object_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.served_model_name, "choices": choices, "usage": _usage(list(finals.values())),
        }, checkpoints)

    async def _openai_stream(self, jobs, chat: bool, object_id: str, created: int, choice_index,
                             with_logprobs: bool, include_usage: bool,
                             tools: ForcedToolCalls | None) -> AsyncIterator[tuple[dict, tuple | None]]:
        """Chunks as the outputs grow (with their (choice index, output), for `_sse`). Forced tool calls: a
        named function's arguments stream as they are generated; "required" calls are sent whole once the
        output is complete (when they parse). A resumed choice continues from its replayed text."""
        shown_text: dict[int, int] = {}  # per choice: characters and tokens already sent
        shown_tokens: dict[int, int] = {}
        shown_offset: dict[int, int] = {}  # completions logprobs: text_offset continues across chunks
        finals: list[tuple[int, RequestOutput]] = []
        chunk = {"id": object_id, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": created, "model": self.served_model_name}
        async for job, out in self._run(jobs):
            index = choice_index(job, out)
            if out.replayed:  # the client has this from the engine this continues: start after it
                shown_text[index] = shown_offset[index] = len(out.text)
                shown_tokens[index] = 0
                if not out.finished:
                    continue
            first = index not in shown_text
            delta_text = out.text[shown_text.get(index, 0):]
            if tools is not None and tools.named is None and not out.finished:
                continue  # "required" calls are sent whole
            if not (delta_text or out.finished or first):
                continue  # nothing new to show yet (a held-back partial character or stop string)
            start = shown_tokens.get(index, 0)
            choice = {"index": index, "finish_reason": _finish(out)}
            if chat:
                delta = {"role": "assistant"} if first else {}
                if tools is None:
                    delta["content"] = delta_text
                elif tools.named is not None:
                    call = {"index": 0, "function": {"arguments": delta_text}}
                    if first:
                        call.update(id=new_call_id(), type="function")
                        call["function"]["name"] = tools.named
                        delta["content"] = None
                    delta["tool_calls"] = [call]
                    if out.finish_reason is not None and out.finish_reason.type == "stop":
                        choice["finish_reason"] = "tool_calls"
                elif calls := _tool_calls(tools, out):
                    delta.update(content=None, tool_calls=[dict(call, index=i) for i, call in enumerate(calls)])
                    choice["finish_reason"] = "tool_calls"
                else:  # ended before the calls were complete: the text as it is
                    delta["content"] = delta_text
                choice["delta"] = delta
                choice["logprobs"] = self._chat_logprobs(out, start) if with_logprobs else None
            else:
                choice["text"] = delta_text
                choice["logprobs"] = (self._completion_logprobs(out, start, shown_offset.get(index, 0))
                                      if with_logprobs else None)
                if with_logprobs:
                    shown_offset[index] = shown_offset.get(index, 0) + sum(map(len, choice["logprobs"]["tokens"]))
            shown_text[index], shown_tokens[index] = len(out.text), len(out.output_token_logprobs)
            if out.finished:
                finals.append((job, out))
            yield dict(chunk, choices=[choice], usage=None), (index, out)
        if include_usage:
            yield dict(chunk, choices=[], usage=_usage(finals)), None

    def _chat_logprobs(self, out: RequestOutput, start: int) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self._token_text(token_id), "logprob": logprob,
                    "bytes": list(token_bytes(self.engine.tokenizer, token_id))}

        content = []
        for (logprob, token_id), top in zip(out.output_token_logprobs[start:], out.output_top_logprobs[start:]):
            content.append(dict(entry(token_id, logprob), top_logprobs=[entry(t, lp) for t, lp in top]))
        return {"content": content}

    def _completion_logprobs(self, out: RequestOutput, start: int, text_offset: int = 0) -> dict:
        """Tokens from `start` on; offsets count from `text_offset` (the text already streamed)."""
        tokens = [self._token_text(t) for _, t in out.output_token_logprobs[start:]]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _ in out.output_token_logprobs[start:]],
            "top_logprobs": [{self._token_text(t): lp for t, lp in top} for top in out.output_top_logprobs[start:]],
            "text_offset": offsets,
        }


def _finish(out: RequestOutput) -> str | None:
    if out.finish_reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(out.finish_reason.type, "abort")


def _tool_calls(tools: ForcedToolCalls | None, out: RequestOutput) -> list[dict] | None:
    """The calls of a forced tool call's output, when it completed (it ended as its grammar allows)."""
    if tools is None or out.finish_reason is None or out.finish_reason.type != "stop":
        return None
    return tools.calls(out.text)


def _usage(finals: list[tuple[int, RequestOutput]]) -> dict:
    """Prompt tokens count once per prompt (the n samples of one prompt share it), as OpenAI does."""
    per_prompt = {job: out for job, out in finals}
    prompt_tokens = sum(o.prompt_tokens for o in per_prompt.values())
    completion = sum(o.completion_tokens for _, o in finals)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in per_prompt.values())}}


async def run_engine_server(args: EngineArgs) -> int:
    """Listen at once, load the model in the background; SIGTERM drains, then exits 0."""
    server = EngineServer(args)
    async with listening(server.app, args.host, args.port) as stop:
        log.info("server.listening", host=args.host, port=args.port, model=args.model)
        loading = asyncio.create_task(server.load())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            log.error("server.load_failed", error=str(loading.exception()))
            return 1
        await stopping
        loading.cancel()
        await server.drain()
    if server.engine is not None:
        server.engine.shutdown()
    log.info("server.stopped")
    return 0
