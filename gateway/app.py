"""The gateway's HTTP front: one request path, top to bottom in `proxy` → `_route` → `_attempt`.

parse just enough (model, the routing text) → choose a routable worker (policy) → one attempt under a
lease of that worker's load (taken and released exactly once) → forward the original bytes
(keep-alive pool) → a JSON answer is read whole, then sent; an event stream is relayed as it arrives,
whole events at a time (backpressure through `write`). An attempt that fails before the client has a
byte is retried on another worker; one that fails once generation has begun is continued on another
worker from the tokens the client has (gateway/failover.py). Worker health is `health.WorkerHealth`:
the gateway reports events to it.

SGLang's control endpoints (`/get_model_info`, `/get_server_info`, `/flush_cache`, `/abort_request`)
are not proxied but answered for the fleet: asked of one worker, or fanned out to all of them and
their answers combined (shapes in docs/sglang-api.md).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from pydantic import ValidationError

from ..serving import listening, presented_key
from ..errors import APIError, bad_request, error_middleware, read_json
from ..limits import INLINE_BODY_BYTES
from ..resume import RESUMABLE_HEADER
from ..validation import describe

from .auth import Authenticator, hash_key
from .config import GatewayConfig, WorkerConfig
from .discovery import DnsDiscovery
from .failover import NotContinued, Progress
from .health import State, Trial, WorkerHealth
from .metrics import GatewayMetrics
from .routing_text import RoutingText, is_batch
from .sessions import Sessions
from .upstream import Answer, Upstream, UpstreamError
from .status import StatusPage
from .cache_prediction import CacheLedger, Usage, answer_usage, stream_usage
from .policies import Decision, RouteRequest, Worker, create_policy

log = structlog.get_logger(__name__)

PROXIED = ("/v1/chat/completions", "/v1/completions", "/generate")
RETRY_STATUSES = {502, 503}
# SGLang's load figures that /get_server_info sums over the workers (the other keys are one worker's).
SUMMED_LOAD = ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "max_total_num_tokens",
               "num_retracted_reqs", "inflight_requests")


class GatewayWorker(Worker):
    """A worker as the gateway tracks it: its health, where it came from, and the models it serves."""

    def __init__(self, name: str, url: str, origin: str, health: WorkerHealth, health_path: str = "/health"):
        super().__init__(name, url)
        self.health_path = health_path  # what the probes ask (a command engine's server may name it otherwise)
        self.origin = origin  # "config" (listed), "engine" (supervised), "admin" (added at run time), "dns"
        self.models: set[str] = set()
        self.health = health

    @property
    def routable(self) -> bool:
        return self.health.routable


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
class Reply:
    """A worker's answer to a control call: its status and body (JSON, or text where SGLang answers in
    plain text); status None, and why in `body`, when it could not be reached."""

    status: int | None
    body: object

    @property
    def ok(self) -> bool:
        return self.status == 200

    def failure(self) -> str:
        """Why it failed, in a few words: the worker's own error message where it sent one."""
        if self.status is None:
            return str(self.body)
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            return f"{self.status} {error.get('code')}: {error.get('message')}"
        return f"status {self.status}: {self.body!s:.200}"

    def detail(self) -> dict:
        """The worker's answer as one entry of a fanned-out answer's "workers"."""
        return {**(self.body if isinstance(self.body, dict) else {"message": self.body}), "status": self.status}


class Gateway:
    def __init__(self, config: GatewayConfig, seed: int | None = None, supervised: frozenset[str] = frozenset()):
        self.config = config
        # Workers named in `supervised` are the supervisor's engines: a reload or the admin API leaves them be.
        self.workers = [self._new_worker(w.name or w.url, w.url, "engine" if (w.name or w.url) in supervised
                                         else "config", w.health_path) for w in config.workers]
        self.policy = create_policy(config.policy.name, seed, **config.policy.options())
        self.auth = Authenticator(config.auth.keys)
        self.metrics = GatewayMetrics()
        self.sessions = Sessions(config.session, on_moved=lambda why: self.metrics.session_moves.labels(why).inc())
        self.cache_ledger = CacheLedger(config.cache_prediction)
        self.routing_text = RoutingText()
        # Ids for requests that bring none: 32 hex digits, a random prefix per process and a counter (a uuid4
        # per request would cost a system call for randomness the id does not need).
        self._request_ids = map("{}{:016x}".format, itertools.repeat(os.urandom(8).hex()), itertools.count())
        self.queued = 0
        self.admitting = True  # False once shutdown begins: new requests get 503
        # Called with (worker name, why) when a worker is found hung (health.py says on what evidence);
        # the supervisor kills and restarts its own engines from here.
        self.on_hung: Callable[[str, str], None] | None = None
        # Whether a worker's process is stopped (SIGSTOP), looked at once per probe round: the supervisor
        # answers for its own engines, None for any other worker.
        self.process_stopped: Callable[[str], bool | None] = lambda name: None
        self.discovery: DnsDiscovery | None = None
        self._probes: dict[str, asyncio.Task] = {}  # the probe in flight of each worker, by name: one at most
        self._capacity = asyncio.Condition()  # notified when a worker finishes a request while requests queue
        self.session: aiohttp.ClientSession | None = None  # probes and control calls
        self.upstream = Upstream()  # proxied requests
        # The request log, bound once: the module's lazy proxy resolves itself again on every line.
        self._request_log = log.bind()
        self.app = web.Application(client_max_size=config.max_request_bytes,
                                   middlewares=[error_middleware(config.max_request_bytes)])
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)
        self.status = StatusPage(self)  # the live status page and its data (gateway/status.py)
        r = self.app.router
        for path in PROXIED:
            r.add_post(path, self.proxy)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/ready", self.ready)
        r.add_get("/workers", self.list_workers)
        for path in ("/get_model_info", "/model_info"):  # SGLang serves both names
            r.add_get(path, self.model_info)
        for path in ("/get_server_info", "/server_info"):
            r.add_get(path, self.server_info)
        r.add_get("/flush_cache", self.flush_cache, allow_head=False)  # SGLang takes GET and POST
        r.add_post("/flush_cache", self.flush_cache)
        r.add_post("/abort_request", self.abort_request)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/admin/workers", self.admin_list_workers)
        r.add_post("/admin/workers", self.admin_add_worker)
        r.add_delete("/admin/workers/{name}", self.admin_remove_worker)
        r.add_post("/admin/workers/{name}/drain", self.admin_drain)
        r.add_post("/admin/workers/{name}/undrain", self.admin_drain)
        self.status.add_routes(r)

    # ---- lifecycle and health -----------------------------------------------------------------

    async def _start(self, app) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             cookie_jar=aiohttp.DummyCookieJar())
        await asyncio.gather(*(self._probe(w) for w in self.workers))
        self._prober = asyncio.create_task(self._probe_forever())
        self._set_discovery(self.config)

    async def _stop(self, app) -> None:
        self._prober.cancel()
        for probe in self._probes.values():
            probe.cancel()
        self._set_discovery(None)
        self.upstream.close()
        await self.session.close()

    @property
    def inflight(self) -> int:
        return sum(w.inflight for w in self.workers)

    def stop_admitting(self) -> None:
        """Shutdown: requests from now on get 503 (and /ready fails) while those in flight finish."""
        self.admitting = False

    async def _probe_forever(self) -> None:
        """Rounds every interval that no slow worker holds up: a worker whose last probe is still out
        gets no second one, but the stall watchdog and the process check see every worker each round."""
        while True:
            await asyncio.sleep(self.config.health.interval)
            for w in self.workers:
                w.health.check_stall(w.inflight)  # before the probe: a stalled worker's probe must not re-admit it
                stopped = self.process_stopped(w.name)
                if stopped is not None:
                    w.health.process_checked(stopped)
                self._probe_soon(w)

    def _hung(self, name: str, why: str) -> None:
        if self.on_hung is not None:
            self.on_hung(name, why)

    def _new_worker(self, name: str, url: str, origin: str, health_path: str = "/health") -> GatewayWorker:
        return GatewayWorker(name, url, origin, WorkerHealth(name, self.config.health, on_hung=self._hung), health_path)

    # ---- supervisor hooks ---------------------------------------------------------------------------

    def worker_exited(self, name: str) -> None:
        """The worker's process died: out of rotation at once, and its cache is gone."""
        worker = self._worker(name)
        worker.health.exited()
        self.policy.forget(worker)

    def worker_restarted(self, name: str) -> None:
        """A new process with an empty cache: forget its prefixes; probes re-admit it once it is up."""
        worker = self._worker(name)
        worker.models.clear()
        worker.health.restarted()
        self.policy.forget(worker)

    async def worker_ready(self, name: str) -> bool:
        """The supervisor saw the engine answer /health: learn its models and route to it now."""
        worker = self._worker(name)
        worker.models.clear()
        await self._probe(worker, admit=True)
        return worker.health.state is State.READY

    def set_draining(self, name: str, draining: bool) -> GatewayWorker:
        worker = self._worker(name)
        worker.health.drain(draining)
        return worker

    def add_worker(self, name: str, url: str, origin: str, health_path: str = "/health") -> GatewayWorker:
        if any(w.name == name for w in self.workers):
            raise APIError(409, f"a worker named {name!r} exists", param="name", code="worker_exists")
        worker = self._new_worker(name, url, origin, health_path)
        self.workers.append(worker)
        log.info("gateway.worker_added", worker=name, url=url, origin=origin)
        return worker

    def remove_worker(self, name: str) -> GatewayWorker:
        worker = self._worker(name)
        self.workers.remove(worker)  # in-flight requests hold their own reference and finish
        self.policy.forget(worker)
        log.info("gateway.worker_removed", worker=worker.name, inflight=worker.inflight)
        return worker

    # ---- reload (SIGHUP) ------------------------------------------------------------------------------

    def reload(self, config: GatewayConfig) -> list[str]:
        """Apply a new config without dropping a request; returns the fields that need a restart."""
        old, self.config = self.config, config
        self.auth.update(config.auth.keys)
        for w in self.workers:
            w.health.settings = config.health
        self.sessions.settings, self.cache_ledger.settings = config.session, config.cache_prediction
        if config.policy != old.policy:
            options = config.policy.options()
            if config.policy.name != old.policy.name or not self.policy.retune(**options):
                self.policy = create_policy(config.policy.name, None, **options)
                log.info("gateway.policy_replaced", policy=config.policy.name)
        listed = {w.name or w.url: w for w in config.workers}
        for w in [w for w in self.workers if w.origin == "config"]:
            if w.name not in listed or (listed[w.name].url, listed[w.name].health_path) != (w.url, w.health_path):
                self.remove_worker(w.name)
        known = {w.name for w in self.workers}
        for name, spec in listed.items():
            if name not in known:
                self._probe_soon(self.add_worker(name, spec.url, "config", spec.health_path))
        if config.discovery != old.discovery:
            self._set_discovery(config)
        return [f for f in ("host", "port", "max_request_bytes") if getattr(config, f) != getattr(old, f)]

    def _set_discovery(self, config: GatewayConfig | None) -> None:
        if self.discovery is not None:
            self.discovery.stop()
        self.discovery = None
        if config is not None and config.discovery is not None:
            self.discovery = DnsDiscovery(config.discovery, self._discovered)
            self.discovery.start()

    def _discovered(self, urls: set[str]) -> None:
        """The DNS records changed: add new addresses as workers, remove the ones that left."""
        for w in [w for w in self.workers if w.origin == "dns" and w.url not in urls]:
            self.remove_worker(w.name)
        known = {w.url for w in self.workers}
        for url in sorted(urls - known):
            self._probe_soon(self.add_worker(url.split("://", 1)[1], url, "dns"))

    def _probe_soon(self, worker: GatewayWorker) -> None:
        """Probe a worker now without waiting for the answer, unless its last probe is still out."""
        if worker.name in self._probes:
            return
        task = self._probes[worker.name] = asyncio.get_running_loop().create_task(self._probe(worker))
        task.add_done_callback(lambda _: self._probes.pop(worker.name, None))

    def _worker(self, name: str) -> GatewayWorker:
        for w in self.workers:
            if w.name == name:
                return w
        raise APIError(404, f"no worker named {name!r}", param="name", code="worker_not_found")

    async def _probe(self, worker: GatewayWorker, admit: bool = False) -> None:
        """One probe, reported to the worker's health; `admit` (the supervisor's word) readmits at once.
        A timeout is told apart from a failure: a slow answer is no evidence of a hang (health.py)."""
        try:
            since_progress = await self._answers(worker)
        except asyncio.TimeoutError:
            worker.health.probe_timed_out()
            return
        if since_progress is None:
            worker.health.probe_failed()
        elif admit:
            worker.health.admit()
        else:
            worker.health.probe_ok(since_progress)

    async def _answers(self, worker: GatewayWorker) -> float | None:
        """None unless its health path answers 200 (and /v1/models, until the worker's models are known); else
        the engine's heartbeat: seconds its scheduler has had work without finishing a step (0 from a
        worker that reports none). Raises asyncio.TimeoutError when no answer comes in time."""
        timeout = aiohttp.ClientTimeout(total=self.config.health.timeout)
        try:
            async with self.session.get(worker.url + worker.health_path, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                body = await resp.read()
            if not worker.models:
                async with self.session.get(worker.url + "/v1/models", timeout=timeout) as resp:
                    worker.models = {m["id"] for m in (await resp.json())["data"]}
                await self.routing_text.learn(self.session, worker.url, worker.models, timeout)
        except asyncio.TimeoutError:
            raise  # aiohttp's timeouts are ClientErrors too: not a failure
        except (aiohttp.ClientError, KeyError, ValueError):
            return None
        return _since_progress(body)

    # ---- the request path ---------------------------------------------------------------------------

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
            self.metrics.latency_by[request.path,].observe(time.perf_counter() - started)
            self.metrics.responses_by[request.path, str(status)].inc()

    async def _proxy(self, request: web.Request, started: float) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id") or next(self._request_ids)
        if not self.admitting:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        key = self.auth.identify(request)
        body = await read_json(request)  # nesting bounded (sglang_gw/limits.py); the engine checks the rest
        raw = await request.read()  # cached by aiohttp: forwarded as the client sent it
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        model = _requested_model(request.path, body)
        try:
            with self.auth.admit(key, model):
                return await self._route(request, request_id, body, model, raw, started)
        except asyncio.CancelledError:  # the client went away (its handler is cancelled): a normal ending
            self._client_left(request_id)
            raise

    def _client_left(self, request_id: str) -> None:
        self.metrics.client_disconnects.inc()
        log.info("gateway.client_disconnected", request_id=request_id)

    async def _route(self, request: web.Request, request_id: str, body: dict, model: str | None, raw: bytes,
                     started: float) -> web.StreamResponse:
        """Attempts until a worker answers, each on a worker not tried yet while there is one. Until the
        client has a byte, a failed attempt is retried from the start (max_retries). Once a worker has
        said what it generated (a stream begun, a long answer's checkpoints), the next attempt continues
        from there instead (max_failovers; gateway/failover.py); a stream that nobody can continue ends
        with an error event."""
        self._require_model(model)
        # Only for a policy that reads it (least_conn and round_robin do not): rendering a conversation with
        # the chat template is most of a request's routing cost; a large one goes to a thread.
        if not self.policy.uses_text:
            text = ""
        elif len(raw) <= INLINE_BODY_BYTES:
            text = self.routing_text(request.path, body)
        else:
            text = await asyncio.to_thread(self.routing_text, request.path, body)
        route = RouteRequest(text, self.sessions.key(request.headers, body, model), is_batch(request.path, body),
                             self.cache_ledger.distrusted())
        progress = Progress(body)
        tried: set[str] = set()
        retries = failovers = 0
        kind = ""  # a repeated attempt's route: "retry" or "failover"
        while (decision := await self._choose(model, tried, route)) is not None:
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
                    log.info("gateway.stream_failed", request_id=request_id, worker=decision.worker.name, why=broken,
                             choices=len(progress.ids), tokens=sum(map(len, progress.ids.values())))
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

    async def _choose(self, model: str | None, tried: set[str], route: RouteRequest) -> Decision | None:
        """The policy's pick among the routable workers of the model below their cap, untried ones first
        (workers added since the request came are candidates too); None: none left (503 when none of the
        model's workers is ready to begin with)."""
        routable = self._serving(model)
        untried = [w for w in routable if w.name not in tried] or routable
        if not untried:
            if not tried:
                raise no_ready_worker()
            return None
        free = await self._with_capacity(untried)
        return self.sessions.choose(self.policy, free, route) if free else None

    # An attempt's lease: its share of the worker's load, from `_lease` until its answer is handed over,
    # then `_release`d exactly once (a try/finally in `_route`; an async context manager costs more per request).
    def _lease(self, worker: GatewayWorker) -> Trial | None:
        worker.inflight += 1
        return worker.health.request_started()

    async def _release(self, worker: GatewayWorker, trial: Trial | None) -> None:
        worker.health.request_ended(trial)
        worker.inflight -= 1
        if self.queued:  # only a queued request waits on it
            async with self._capacity:
                self._capacity.notify()

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
        """Every attempt's metrics and log line, from its outcome (a stream's once its first byte is in)."""
        self.status.attempted(path, outcome, started)
        m, worker = self.metrics, outcome.decision.worker
        m.decisions_by[outcome.route,].inc()
        m.predicted_prefix.inc(outcome.decision.matched_bytes)
        if outcome.route == "retry":
            m.retries.inc()
        elif outcome.route == "failover":
            m.failovers.inc()
        fields = dict(request_id=request_id, path=path, worker=worker.name, route=outcome.route,
                      matched_bytes=outcome.decision.matched_bytes, status=outcome.status,
                      seconds=round(time.perf_counter() - started, 4))
        if outcome.response is None:
            self._request_log.info("gateway.attempt_failed", why=outcome.failure, **fields)
            return
        m.ttfb_by[path,].observe(outcome.answered_at - started)
        m.requests_by[path, str(outcome.status), worker.name].inc()
        if outcome.usage is not None:
            self._book_cache(outcome.decision, outcome.usage)
        self._request_log.info("gateway.request", **fields)

    def _book_cache(self, decision: Decision, usage: Usage) -> None:
        """An answer's reported cached tokens, next to what routing predicted for it (cache_prediction.py)."""
        worker = decision.worker.name
        self.metrics.reported_cached_by[worker,].inc(usage.cached_tokens)
        if (predicted := self.cache_ledger.record(decision, usage)) is not None:
            self.metrics.predicted_cached_by[worker,].inc(predicted)

    async def _with_capacity(self, candidates: list[GatewayWorker]) -> list[GatewayWorker]:
        """The candidates below the per-worker cap, waiting in the bounded queue while there are none."""
        limit = self.config.max_inflight_per_worker
        free = [w for w in candidates if limit is None or w.inflight < limit]
        if free:
            return free
        if self.queued >= self.config.max_queued_requests:
            raise APIError(503, "every worker is at its concurrency limit and the queue is full",
                           code="queue_full", headers={"Retry-After": "1"})
        self.queued += 1
        try:
            async with self._capacity:
                await asyncio.wait_for(self._capacity.wait_for(
                    lambda: any(w.inflight < limit for w in candidates)), self.config.queue_timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"no worker freed up within {self.config.queue_timeout}s", code="queue_timeout",
                           headers={"Retry-After": "1"}) from None
        finally:
            self.queued -= 1
        # Routable again after the wait: the pick and the lease (which may claim a half-open breaker's one
        # trial) then see the same picture, with nothing running in between.
        return [w for w in candidates if w.inflight < limit and w.routable]

    def _require_model(self, model: str | None) -> None:
        """404 when no worker serves the model."""
        if model is not None and not any(model in w.models for w in self.workers):
            served = sorted({m for w in self.workers for m in w.models})
            raise APIError(404, f"model {model!r} is not served here; available: {served}", param="model",
                           code="model_not_found")

    def _serving(self, model: str | None) -> list[GatewayWorker]:
        return [w for w in self.workers if w.routable and (model is None or model in w.models)]

    # ---- the gateway's own endpoints --------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        key = self.auth.identify(request)
        served = sorted({m for w in self.workers if w.routable for m in w.models
                         if key is None or key.models is None or m in key.models})
        now = int(time.time())
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "sglang-gw"} for m in served]})

    async def health(self, request: web.Request) -> web.Response:
        if not self.config.auth.open_health:
            self.auth.identify(request)
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.config.auth.open_health:
            self.auth.identify(request)
        ready = sum(w.routable for w in self.workers) if self.admitting else 0
        return web.json_response({"ready_workers": ready}, status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        if not self.config.auth.open_metrics:
            self.auth.identify(request)
        return web.Response(body=self.metrics_text(), content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> bytes:
        """The /metrics exposition, with the fleet's gauges set from the state right now."""
        return self.metrics.render(self.workers, self.policy, self.sessions, self.cache_ledger, self.queued)

    async def list_workers(self, request: web.Request) -> web.Response:
        self.auth.identify(request)
        return self._workers_response()

    def _workers_response(self) -> web.Response:
        return web.json_response({"workers": [self.describe_worker(w) for w in self.workers]})

    def describe_worker(self, w: GatewayWorker) -> dict:
        """A worker as /workers (and the status page) shows it."""
        return {"name": w.name, "url": w.url, "origin": w.origin, "state": w.health.state.value,
                "breaker": w.health.breaker.value, "draining": w.health.draining, "inflight": w.inflight,
                "models": sorted(w.models), "prefix_bytes": self.policy.tracked_bytes(w)}

    # ---- SGLang's control endpoints, answered for the fleet ---------------------------------------

    async def model_info(self, request: web.Request) -> web.Response:
        """One routable worker's model facts (SGLang's frontend picks its chat template by `model_path`)."""
        self.auth.identify(request)
        for worker in [w for w in self.workers if w.routable]:
            reply = await self._call(worker, "GET", "/get_model_info", timeout=self.config.health.timeout)
            if reply.ok and isinstance(reply.body, dict):
                return web.json_response(reply.body, headers={"x-sglang-gw-worker": worker.name})
        raise no_ready_worker()

    async def server_info(self, request: web.Request) -> web.Response:
        """The first ready worker's server info with the load summed over all workers that answered,
        and each worker's own info under "workers" (null when it is not ready or did not answer)."""
        self.auth.identify(request)
        ready = [w for w in self.workers if w.health.state is State.READY]  # draining ones still carry load
        replies = await self.call_all(ready, "GET", "/get_server_info", timeout=self.config.health.timeout)
        infos = {name: r.body for name, r in replies.items() if r.ok and isinstance(r.body, dict)}
        if not infos:
            raise no_ready_worker()
        fleet = dict(next(iter(infos.values())))
        for key in SUMMED_LOAD:
            if key in fleet:
                fleet[key] = sum(v for info in infos.values() if isinstance(v := info.get(key), (int, float)))
        if "token_usage" in fleet and fleet.get("max_total_num_tokens"):
            fleet["token_usage"] = fleet.get("num_used_tokens", 0) / fleet["max_total_num_tokens"]
        fleet["workers"] = [{"name": w.name, "url": w.url, "state": w.health.state.value, "info": infos.get(w.name)}
                            for w in self.workers]
        return web.json_response(fleet)

    async def flush_cache(self, request: web.Request) -> web.Response:
        """Every routable worker's prefix cache emptied, or an error naming the workers that refused."""
        self.auth.identify(request)
        workers = [w for w in self.workers if w.routable]
        return fanned_out("cache flush", await self.call_all(workers, "POST", "/flush_cache"))

    async def abort_request(self, request: web.Request) -> web.Response:
        """The request `rid` (or all requests) aborted on whichever worker runs it: sent to every ready
        worker, draining ones included (they still run requests)."""
        self.auth.identify(request)
        body = await read_json(request)
        # The engine's rule, checked once here rather than refused by every worker.
        if not isinstance(body, dict) or not isinstance(body.get("rid", ""), str):
            raise bad_request('expected {"rid": str, "abort_all": bool}', "rid")
        if not body.get("rid") and not body.get("abort_all"):
            raise bad_request("give rid or abort_all", "rid")
        workers = [w for w in self.workers if w.health.state is State.READY]
        return fanned_out("abort", await self.call_all(workers, "POST", "/abort_request", body))

    async def call_all(self, workers: list[GatewayWorker], method: str, path: str, body: object = None,
                        timeout: float | None = None) -> dict[str, Reply]:
        """The same control call to each worker at once; their replies by worker name."""
        replies = await asyncio.gather(*(self._call(w, method, path, body, timeout) for w in workers))
        return {w.name: r for w, r in zip(workers, replies)}

    async def _call(self, worker: GatewayWorker, method: str, path: str, body: object = None,
                    timeout: float | None = None) -> Reply:
        """One control call. It takes no lease and reports nothing to the worker's health: it is no
        request of a client, and the probes judge health."""
        timeout = aiohttp.ClientTimeout(total=timeout or self.config.request_timeout)
        try:
            async with self.session.request(method, worker.url + path, json=body, timeout=timeout) as resp:
                status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError) as exc:
            return Reply(None, type(exc).__name__ + (f": {exc}" if str(exc) else ""))
        try:
            return Reply(status, json.loads(text))
        except ValueError:
            return Reply(status, text)  # SGLang's /flush_cache and /abort_request answer in plain text

    # ---- admin API (behind the admin key) -----------------------------------------------------------

    def require_admin(self, request: web.Request) -> None:
        # The config's hash, else $SGLANG_GW_ADMIN_KEY (e.g. from systemd's EnvironmentFile or a Secret).
        env_key = os.environ.get("SGLANG_GW_ADMIN_KEY")
        expected = self.config.admin.key_hash or (hash_key(env_key) if env_key else None)
        if expected is None:
            raise APIError(403, "the admin API is disabled: set admin.key_hash in the config or $SGLANG_GW_ADMIN_KEY",
                           code="admin_disabled")
        if not hmac.compare_digest(hash_key(presented_key(request)), expected):
            raise APIError(401, "invalid or missing admin key", code="invalid_api_key")

    async def admin_list_workers(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        return self._workers_response()

    async def admin_add_worker(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await read_json(request)
        try:
            spec = WorkerConfig.model_validate(body)
        except ValidationError as exc:
            param, why = describe(exc)
            raise bad_request(f"{param}: {why}" if param else why, param) from None
        worker = self.add_worker(spec.name or spec.url, spec.url, "admin", spec.health_path)
        await self._probe(worker)
        return web.json_response({"name": worker.name, "state": worker.health.state.value}, status=201)

    async def admin_remove_worker(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        if self._worker(request.match_info["name"]).origin == "engine":
            raise APIError(409, "a local engine is managed by the supervisor: drain it, or restart it with "
                                "POST /admin/engines/NAME/restart", param="name", code="worker_supervised")
        worker = self.remove_worker(request.match_info["name"])
        return web.json_response({"removed": worker.name, "inflight": worker.inflight})

    async def admin_drain(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        worker = self.set_draining(request.match_info["name"], request.path.endswith("/drain"))
        return web.json_response({"name": worker.name, "draining": worker.health.draining,
                                  "inflight": worker.inflight})


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


def fanned_out(action: str, replies: dict[str, Reply]) -> web.Response:
    """200 when every worker did it. Otherwise an error naming each worker that did not and why: 400 when
    each of them refused (a 4xx, e.g. the engine's "busy" while requests run), else 502."""
    log.info("gateway.fanned_out", action=action, statuses={name: r.status for name, r in replies.items()})
    if not replies:
        raise no_ready_worker()
    failed = {name: r for name, r in replies.items() if not r.ok}
    if failed:
        refused = all(r.status is not None and 400 <= r.status < 500 for r in failed.values())
        why = "; ".join(f"{name}: {r.failure()}" for name, r in failed.items())
        raise APIError(400 if refused else 502, f"{action} failed on {len(failed)} of {len(replies)} workers ({why})",
                       code="worker_refused" if refused else "upstream_unavailable")
    return web.json_response({"success": True, "message": f"{action} done on {len(replies)} workers",
                              "workers": {name: r.detail() for name, r in replies.items()}})


async def _answer_body(upstream: Answer, progress: Progress) -> bytes:
    """A non-streamed answer that came as checkpoints and then the JSON (sglang_gw/resume.py): the JSON."""
    data = b""
    while chunk := await upstream.chunk():
        data += progress.feed(chunk)
    data += progress.flush()
    if not data.startswith(b"data: "):
        raise UpstreamError("the answer ended before its JSON")
    return data[len(b"data: "):].rstrip(b"\n")


def no_ready_worker() -> APIError:
    return APIError(503, "no worker is ready", code="no_ready_worker", headers={"Retry-After": "2"})


def _since_progress(health_body: bytes) -> float:
    """`since_progress_s` from an engine's /health answer (engine/server.py); 0 from a worker that
    reports no heartbeat (SGLang's /health is empty)."""
    try:
        report = json.loads(health_body)
        return float(report.get("since_progress_s", 0.0)) if isinstance(report, dict) else 0.0
    except (ValueError, TypeError):
        return 0.0


async def run_gateway(config: GatewayConfig) -> int:
    """The gateway alone, in front of the workers its config lists; until SIGTERM/SIGINT."""
    gateway = Gateway(config)
    async with listening(gateway.app, config.host, config.port) as stop:
        log.info("gateway.listening", host=config.host, port=config.port, policy=config.policy.name,
                 workers=[w.url for w in config.workers])
        await stop.wait()
    return 0
