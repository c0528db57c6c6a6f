"""The gateway process: the fleet's routing state (workers and their health, the policy, sessions, key
limits, the cache ledger, metrics, the status page) and its HTTP front. The proxied paths' handler is
request_path.RequestPath, whose hooks this class answers from that state; worker health is
`health.WorkerHealth`, which the request path reports events to.

SGLang's control endpoints (`/get_model_info`, `/get_server_info`, `/flush_cache`, `/abort_request`)
are not proxied but answered for the fleet: asked of one worker, or fanned out to all of them and
their answers combined (shapes in docs/sglang-api.md).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
import structlog
from aiohttp import web

from pydantic import ValidationError

from ..serving import presented_key
from ..errors import APIError, bad_request, error_middleware, read_json
from ..validation import describe

from .auth import Authenticator, KeyState, hash_key
from .config import GatewayConfig, WorkerConfig
from .discovery import DnsDiscovery
from .health import State, Trial, WorkerHealth
from .metrics import GatewayMetrics
from .relays import Relays, serving
from .request_path import PROXIED, AtCapacity, RequestPath
from .routing_text import RoutingText
from .sessions import Sessions
from .upstream import Upstream
from .status import Attempt, StatusPage
from .cache_prediction import CacheLedger, Usage
from .policies import Decision, RouteRequest, Worker, create_policy

log = structlog.get_logger(__name__)

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


class Gateway(RequestPath):
    def __init__(self, config: GatewayConfig, seed: int | None = None, supervised: frozenset[str] = frozenset()):
        super().__init__()
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
        self.routing_text.on_learned = self._settings_changed
        self.relays: Relays | None = None  # the relay processes, while `processes` > 1 (relays.serving)
        self.queued = 0
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
        """Shutdown: requests from now on get 503 (and /ready fails) while those in flight finish, the
        relays' as well."""
        self.admitting = False
        self._settings_changed()

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
        self._settings_changed()
        return [f for f in ("host", "port", "max_request_bytes", "processes") if getattr(config, f) != getattr(old, f)]

    def _settings_changed(self) -> None:
        if self.relays is not None:
            self.relays.push_settings()

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
        if (worker := self.worker_named(name)) is None:
            raise APIError(404, f"no worker named {name!r}", param="name", code="worker_not_found")
        return worker

    def worker_named(self, name: str) -> GatewayWorker | None:
        return next((w for w in self.workers if w.name == name), None)

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

    # ---- the request path's hooks (request_path.py), answered from this process's state ------------------

    @property
    def _uses_text(self) -> bool:
        return self.policy.uses_text

    def _admit(self, key: KeyState | None, model: str | None):
        return self.auth.admit(key, model)

    async def _choose(self, model: str | None, admission, tried: set[str], route: RouteRequest) -> Decision | None:
        choice = self.choose_now(model, tried, route)
        return await self.choose_queued(choice, route) if isinstance(choice, AtCapacity) else choice

    def choose_now(self, model: str | None, tried: set[str], route: RouteRequest) -> Decision | AtCapacity | None:
        """The policy's pick among the routable workers of the model below their cap, untried ones first
        (workers added since the request came are candidates too); None: none left (404 when no worker
        serves the model; 503 when none of its workers is ready to begin with). When every candidate is at
        its cap, `AtCapacity`: `choose_queued` waits for one (the only choice that waits, so a relay's
        others are answered at once, without a task)."""
        if not tried:
            self._require_model(model)
        routable = self._serving(model)
        untried = [w for w in routable if w.name not in tried] or routable
        if not untried:
            if not tried:
                raise no_ready_worker()
            return None
        limit = self.config.max_inflight_per_worker
        free = [w for w in untried if limit is None or w.inflight < limit]
        return self._decide(free, route) if free else AtCapacity(untried)

    async def choose_queued(self, full: AtCapacity, route: RouteRequest) -> Decision | None:
        """The choice once one of the candidates is below its cap, waiting in the bounded queue."""
        free = await self._with_capacity(full.candidates)
        return self._decide(free, route) if free else None

    def _decide(self, free: list[GatewayWorker], route: RouteRequest) -> Decision:
        route.distrusted = self.cache_ledger.distrusted()
        return self.sessions.choose(self.policy, free, route)

    # An attempt's lease: its share of the worker's load, from `_lease` until its answer is handed over,
    # then `_release`d exactly once (a try/finally in `_route`; an async context manager costs more per request).
    def _lease(self, worker: GatewayWorker) -> Trial | None:
        worker.inflight += 1
        return worker.health.request_started()

    async def _release(self, worker: GatewayWorker, trial: Trial | None) -> None:
        if self._freed(worker, trial):
            await self._wake_one()

    def release_soon(self, worker: GatewayWorker, trial: Trial | None) -> None:
        """A relay's lease ended (relays.py): released now, a queued request woken by a task."""
        if self._freed(worker, trial):
            asyncio.get_running_loop().create_task(self._wake_one())

    def _freed(self, worker: GatewayWorker, trial: Trial | None) -> bool:
        """The lease given back; whether a queued request waits for it."""
        worker.health.request_ended(trial)
        worker.inflight -= 1
        return self.queued > 0

    async def _wake_one(self) -> None:
        async with self._capacity:
            self._capacity.notify()

    def _book(self, attempt: Attempt, decision: Decision, usage: Usage | None) -> None:
        """An attempt's metrics and status-page entry, whichever process ran it (a relay's come over its link)."""
        self.status.attempted(attempt)
        m = self.metrics
        m.decisions_by[attempt.route,].inc()
        m.predicted_prefix.inc(attempt.matched_bytes)
        if attempt.route == "retry":
            m.retries.inc()
        elif attempt.route == "failover":
            m.failovers.inc()
        if attempt.ttfb_s is None:  # no answer
            return
        m.ttfb_by[attempt.path,].observe(attempt.ttfb_s)
        m.requests_by[attempt.path, str(attempt.status), attempt.worker].inc()
        if usage is not None:
            self._book_cache(decision, usage)

    def _book_cache(self, decision: Decision, usage: Usage) -> None:
        """An answer's reported cached tokens, next to what routing predicted for it (cache_prediction.py)."""
        worker = decision.worker.name
        self.metrics.reported_cached_by[worker,].inc(usage.cached_tokens)
        if (predicted := self.cache_ledger.record(decision, usage)) is not None:
            self.metrics.predicted_cached_by[worker,].inc(predicted)

    async def _with_capacity(self, candidates: list[GatewayWorker]) -> list[GatewayWorker]:
        """The candidates below the per-worker cap once there is one, waiting in the bounded queue."""
        limit = self.config.max_inflight_per_worker
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
        if model is None:
            return
        for w in self.workers:  # a loop, not any() over a generator: this runs on every request
            if model in w.models:
                return
        served = sorted({m for w in self.workers for m in w.models})
        raise APIError(404, f"model {model!r} is not served here; available: {served}", param="model",
                       code="model_not_found")

    def _serving(self, model: str | None) -> list[GatewayWorker]:
        return [w for w in self.workers if w.routable and (model is None or model in w.models)]

    def _finished(self, path: str, status: int, seconds: float) -> None:
        self.metrics.latency_by[path,].observe(seconds)
        self.metrics.responses_by[path, str(status)].inc()

    def _count_disconnect(self) -> None:
        self.metrics.client_disconnects.inc()

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
        # With relays, ready once all of them listen: the port's whole capacity (a relay started again later
        # does not make the gateway unready).
        serving = self.admitting and (self.relays is None or self.relays.listening)
        ready = sum(w.routable for w in self.workers) if serving else 0
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
    async with serving(gateway, config.host, config.port) as stop:
        log.info("gateway.listening", host=config.host, port=config.port, policy=config.policy.name,
                 workers=[w.url for w in config.workers], processes=config.processes)
        await stop.wait()
    return 0
