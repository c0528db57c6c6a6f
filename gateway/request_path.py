"""The proxied request's path, top to bottom in `proxy` → `_route` → `_attempt` → `_relay`.

parse just enough (model, the routing text) → choose a routable worker (policy) → one attempt under a
lease of that worker's load (taken and released exactly once) → forward the original bytes
(keep-alive pool) → a JSON answer is read whole, then sent; an event stream is relayed as it arrives,
whole events at a time (backpressure through `write`). An attempt that fails before the client has a
byte is retried on another worker; one that fails once generation has begun is continued on another
worker from the tokens the client has (gateway/failover.py).

The path is written once, here, for the two processes that run it. The routing state it consults
(admission, the choice and its lease, worker health, what is booked afterwards) sits behind the hooks
at the bottom of `RequestPath`: the gateway process (`app.Gateway`) answers them from its own state;
a relay process (`relay.Relay`, `gateway.processes` > 1) asks the gateway process for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..errors import APIError, bad_request, parse_json_to_read, read_json
from ..limits import INLINE_BODY_BYTES
from ..resume import RESUMABLE_HEADER

from .auth import Authenticator, KeyState
from .cache_prediction import Usage, answer_usage, stream_usage
from .config import GatewaySettings
from .failover import NotContinued, Progress
from .policies import Decision, RouteRequest, Worker
from .routing_text import RoutingText, is_batch
from .sessions import Sessions
from .status import Attempt
from .upstream import Answer, Upstream, UpstreamError

log = structlog.get_logger(__name__)

PROXIED = ("/v1/chat/completions", "/v1/completions", "/generate")
RETRY_STATUSES = {502, 503}


@dataclass(slots=True)  # not frozen: made per attempt (policies/base.py says why)
class Outcome:
    """How one attempt ended: an answer for the client, or a failure that another worker may mend."""

    decision: Decision
    route: str  # x-sglang-gw-route: the policy's reason, or "retry"
    status: int | None = None  # the worker's HTTP status; None when it never answered
    response: web.StreamResponse | None = None  # None: failed before any byte reached the client
    stream: Answer | None = None  # an event stream still to relay into `response`
    failure: str = ""  # why the attempt failed (with no response)
    answered_at: float = 0.0  # perf_counter() when the worker's answer began
    usage: Usage | None = None  # what the engine reported of the prompt (JSON answers; a stream's as it ends)


@dataclass(frozen=True)
class AtCapacity:
    """A choice that must wait: every candidate worker is at `max_inflight_per_worker` (gateway.app)."""

    candidates: list[Worker]


class RequestPath(ABC):
    """The proxied paths' handler (`proxy`) over the hooks below."""

    config: GatewaySettings
    auth: Authenticator  # identifies the presented key (401); its limits are the routing state's
    sessions: Sessions  # reads a request's session key; where a session is pinned is the routing state's
    routing_text: RoutingText
    upstream: Upstream

    def __init__(self):
        self.admitting = True  # False once shutdown begins: new requests get 503
        # Ids for requests that bring none: 32 hex digits, a random prefix per process and a counter (a uuid4
        # per request would cost a system call for randomness the id does not need).
        self._request_ids = map("{}{:016x}".format, itertools.repeat(os.urandom(8).hex()), itertools.count())
        # The request log, bound once: the module's lazy proxy resolves itself again on every line.
        self._request_log = log.bind()

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """A proxied request, counted by the status the client gets: the engine's, or the gateway's own
        refusal (queue full, no worker ready, every attempt failed, bad input: raised as APIError)."""
        started = time.perf_counter()
        status = 500  # an unexpected exception: the error middleware answers it with a 500
        try:
            response = await self._proxy(request, started)
            status = response.status
            return response
        except (APIError, web.HTTPException) as exc:  # aiohttp's own: a body over the size limit (413)
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # nginx's "client closed request"
            raise
        finally:
            self._finished(request.path, status, time.perf_counter() - started)

    async def _proxy(self, request: web.Request, started: float) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id") or next(self._request_ids)
        if not self.admitting:
            raise shutting_down()
        key = self.auth.identify(request)
        # Read for routing, not written back (the engine checks the rest): nesting bounded (sglang_gw/limits.py).
        body = await read_json(request, parse_json_to_read)
        raw = await request.read()  # cached by aiohttp: forwarded as the client sent it
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        model = _requested_model(request.path, body)
        try:
            with (admission := self._admit(key, model)):
                return await self._route(request, request_id, body, model, admission, raw, started)
        except asyncio.CancelledError:  # the client went away (its handler is cancelled): a normal ending
            self._client_left(request_id)
            raise

    def _client_left(self, request_id: str) -> None:
        self._count_disconnect()
        log.info("gateway.client_disconnected", request_id=request_id)

    def _stream_failed(self, request_id: str, worker: str, why: str, progress: Progress) -> None:
        """A stream's worker failed mid-answer (the next attempt may continue it)."""
        log.info("gateway.stream_failed", request_id=request_id, worker=worker, why=why,
                 choices=len(progress.ids), tokens=sum(map(len, progress.ids.values())))

    async def _route(self, request: web.Request, request_id: str, body: dict, model: str | None, admission,
                     raw: bytes, started: float) -> web.StreamResponse:
        """Attempts until a worker answers, each on a worker not tried yet while there is one. Until the
        client has a byte, a failed attempt is retried from the start (max_retries). Once a worker has
        said what it generated (a stream begun, a long answer's checkpoints), the next attempt continues
        from there instead (max_failovers; gateway/failover.py); a stream that nobody can continue ends
        with an error event."""
        # Only for a policy that reads it (least_conn and round_robin do not): rendering a conversation with
        # the chat template is most of a request's routing cost; a large one goes to a thread.
        if not self._uses_text:
            text = ""
        elif len(raw) <= INLINE_BODY_BYTES:
            text = self.routing_text(request.path, body)
        else:
            text = await asyncio.to_thread(self.routing_text, request.path, body)
        route = RouteRequest(text, self.sessions.key(request.headers, body, model), is_batch(request.path, body))
        progress = Progress(body, raw)
        tried: set[str] = set()
        retries = failovers = 0
        kind = ""  # a repeated attempt's route: "retry" or "failover"
        while (decision := await self._choose(model, admission, tried, route)) is not None:
            trial = self._lease(decision.worker)
            try:
                outcome = await self._attempt(request, request_id, raw, decision, kind, progress,
                                              last=retries == self.config.max_retries)
                # Booked once the client has the answer's first bytes: metrics, the log line and the status
                # page are off the path to them (callbacks run when this task next waits, or returns).
                asyncio.get_running_loop().call_soon(self._record, request.path, request_id, outcome, started)
                if outcome.stream is not None:
                    if (broken := await self._relay(request, outcome, progress)) is None:
                        if progress.client_gone:
                            self._client_left(request_id)
                        return progress.client
                    self._stream_failed(request_id, decision.worker.name, broken, progress)
                elif outcome.response is not None:
                    return outcome.response
            finally:
                await self._release(decision.worker, trial)
            tried.add(decision.worker.name)
            if progress.continuable:
                if failovers == self.config.max_failovers:
                    break
                failovers, kind, raw = failovers + 1, "failover", progress.resume_body()
            elif progress.client is not None or retries == self.config.max_retries:
                break
            else:
                retries, kind = retries + 1, "retry"
                await asyncio.sleep(self.config.retry_backoff * 2 ** (retries - 1) * random.uniform(0.5, 1.5))
        if progress.client is not None:  # a stream begun that no worker could continue
            error = {"error": {"message": f"the worker failed mid-response and no worker could continue it "
                                          f"({failovers} failovers)", "type": "upstream_error", "param": None,
                               "code": "upstream_failed"}}
            await progress.client.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            await progress.client.write_eof()
            return progress.client
        raise APIError(502, "no worker could take the request", code="upstream_unavailable",
                       headers={"x-should-retry": "false"})

    async def _attempt(self, request: web.Request, request_id: str, raw: bytes, decision: Decision, kind: str,
                       progress: Progress, last: bool) -> Outcome:
        """Forward the request to the chosen worker. A JSON answer is read whole before anything is sent,
        so a worker failing mid-answer is a failed attempt; an event stream is left to `_relay`. A
        continuation (kind "failover") succeeds only with a 200; a first try or retry passes the worker's
        answer on, but for 502/503 while other attempts remain (`last` False)."""
        worker, route = decision.worker, kind or decision.reason
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", "x-request-id": request_id}
        if self.config.max_failovers:
            headers[RESUMABLE_HEADER] = "1"
        try:
            upstream = await self.upstream.post(worker.url, request.path, raw, headers, self.config.request_timeout)
        except UpstreamError as exc:
            why = f"connect: {exc}"
            worker.health.connect_error(why)
            return Outcome(decision, route, failure=why)
        answered_at = time.perf_counter()
        worker.health.response(upstream.status)
        if upstream.status != 200 and (kind == "failover" or upstream.status in RETRY_STATUSES and not last):
            upstream.close()
            return Outcome(decision, route, upstream.status, failure=f"status {upstream.status}")
        headers = _answer_headers(upstream, decision, route, request_id)
        events = headers["Content-Type"].startswith("text/event-stream")
        if events and progress.stream:
            return Outcome(decision, route, upstream.status, response=web.StreamResponse(status=upstream.status,
                                                                                          headers=headers),
                           stream=upstream, answered_at=answered_at)
        try:
            body = await _answer_body(upstream, progress) if events else await upstream.read()
        except UpstreamError as exc:
            why = f"answer: {exc}"
            worker.health.stream_failed(why)
            return Outcome(decision, route, upstream.status, failure=why)
        finally:
            upstream.close()
        if events:  # checkpoints, then the JSON: the client gets the JSON
            headers["Content-Type"] = "application/json; charset=utf-8"
        worker.health.progress()
        return Outcome(decision, route, upstream.status,
                       response=web.Response(status=upstream.status, body=body, headers=headers),
                       answered_at=answered_at,
                       usage=answer_usage(body) if upstream.status == 200 else None)

    async def _relay(self, request: web.Request, outcome: Outcome, progress: Progress) -> str | None:
        """Pass an event stream through as it arrives, whole events at a time; the client's stream begins
        with the first (its headers are the first answering worker's). None when it ended; why, when the
        worker failed mid-stream: the client's stream stays open for another worker to continue."""
        upstream, worker = outcome.stream, outcome.decision.worker
        with_data = b""  # the last events relayed that carry data: a stream's usage, if any, is in them
        try:
            while True:
                try:
                    chunk = await upstream.chunk()
                except UpstreamError as exc:
                    why = f"stream: {exc}"
                    worker.health.stream_failed(why)
                    if not progress.done:
                        return why
                    break  # failed after its last event: the client has everything
                try:
                    events = progress.feed(chunk) if chunk else progress.flush()
                except NotContinued as exc:
                    return f"answer: {exc}"
                if events:
                    if b"data: {" in events:
                        with_data = events
                    if progress.client is None:
                        progress.client = outcome.response
                        await progress.client.prepare(request)
                    await progress.client.write(events)
                if not chunk:
                    break
                worker.health.progress()
            if progress.client is None:  # an empty stream
                progress.client = outcome.response
                await progress.client.prepare(request)
            await progress.client.write_eof()
        except ConnectionResetError:  # the client went away (after [DONE], or not): a normal ending
            progress.client_gone = True
        finally:
            upstream.close()  # on a client disconnect this drops the engine connection: it aborts the request
        if (usage := stream_usage(with_data)) is not None:
            self._book_cache(outcome.decision, usage)
        return None

    def _record(self, path: str, request_id: str, outcome: Outcome, started: float) -> None:
        """Every attempt's log line, metrics and status-page entry, from its outcome (a stream's once its first
        byte is in). The line is written by the process that ran the attempt."""
        attempt = Attempt.of(path, outcome, started)
        fields = dict(request_id=request_id, path=path, worker=attempt.worker, route=attempt.route,
                      matched_bytes=attempt.matched_bytes, status=attempt.status,
                      seconds=round(time.perf_counter() - started, 4))
        if attempt.ttfb_s is None:  # no answer
            self._request_log.info("gateway.attempt_failed", why=attempt.why, **fields)
        else:
            self._request_log.info("gateway.request", **fields)
        self._book(attempt, outcome.decision, outcome.usage)

    # ---- the routing state's hooks ----------------------------------------------------------------------

    @property
    @abstractmethod
    def _uses_text(self) -> bool:
        """Whether the policy reads RouteRequest.text (the request path renders it only then)."""

    @abstractmethod
    def _admit(self, key: KeyState | None, model: str | None) -> contextlib.AbstractContextManager:
        """The request admitted for the whole of its path under its key's model list and limits (403, 429)."""

    @abstractmethod
    async def _choose(self, model: str | None, admission: contextlib.AbstractContextManager, tried: set[str],
                      route: RouteRequest) -> Decision | None:
        """The next attempt's worker (untried ones first), or None when none is left; the first choice
        refuses a model nobody serves (404) and, with no worker ready, 503."""

    @abstractmethod
    def _lease(self, worker: Worker) -> object:
        """The attempt's share of the worker's load, `_release`d exactly once (a try/finally in `_route`)."""

    @abstractmethod
    async def _release(self, worker: Worker, lease: object) -> None: ...

    @abstractmethod
    def _book(self, attempt: Attempt, decision: Decision, usage: Usage | None) -> None:
        """An attempt's metrics and status-page entry (`_record` writes its log line)."""

    @abstractmethod
    def _book_cache(self, decision: Decision, usage: Usage) -> None:
        """A stream's reported cached tokens, next to what routing predicted for it."""

    @abstractmethod
    def _finished(self, path: str, status: int, seconds: float) -> None:
        """The request's end: the status its client got, and how long it took."""

    @abstractmethod
    def _count_disconnect(self) -> None:
        """A client went away before its answer's end (a normal ending, counted)."""


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})


def _requested_model(path: str, body: dict) -> str | None:
    """The model an OpenAI request names (400 unless a string); None on /generate, which has no model field."""
    if path == "/generate":
        return None
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model: a model name is required", "model", "missing_model")
    return model


# The engine's headers that are not passed on: hop-by-hop ones, the framing the gateway redoes, and the
# encoding (the body arrives decoded).
NOT_RELAYED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
                         "date", "server", "proxy-authenticate", "trailer", "upgrade", "te", "x-request-id"})


def _answer_headers(upstream: Answer, decision: Decision, route: str, request_id: str) -> CIMultiDict:
    """The engine's headers a client may use (Retry-After, Cache-Control, its own x-…), and the gateway's."""
    relayed = [(name, value) for name, value in upstream.headers if name.lower() not in NOT_RELAYED]
    if not any(name.lower() == "content-type" for name, _ in relayed):
        relayed.append(("Content-Type", "application/json"))
    relayed += [("x-sglang-gw-worker", decision.worker.name), ("x-sglang-gw-route", route),
                ("x-request-id", request_id), ("x-sglang-gw-matched-bytes", str(decision.matched_bytes))]
    if route in ("retry", "failover"):
        relayed.append(("x-should-retry", "false"))  # we already failed over: the SDK must not multiply retries
    return CIMultiDict(relayed)


async def _answer_body(upstream: Answer, progress: Progress) -> bytes:
    """A non-streamed answer that came as checkpoints and then the JSON (sglang_gw/resume.py): the JSON."""
    data = b""
    while chunk := await upstream.chunk():
        data += progress.feed(chunk)
    data += progress.flush()
    if not data.startswith(b"data: "):
        raise UpstreamError("the answer ended before its JSON")
    return data[len(b"data: "):].rstrip(b"\n")
