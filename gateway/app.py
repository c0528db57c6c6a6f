"""The gateway's HTTP front: one request path, top to bottom in `proxy`.

parse just enough (model, the routing text) → choose a worker (policy) → forward the original bytes
(keep-alive pool) → relay the response bytes as they arrive (SSE passthrough, backpressure through
`write`) → account load on every ending, in a `finally`. Retries go to another worker, and only
before the first response byte.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import signal
import time
import uuid

from typing import Callable

import aiohttp
import structlog
from aiohttp import web

from ..errors import APIError, bad_request, error_middleware, read_json
from pydantic import ValidationError

from .auth import Authenticator, hash_key, presented_key
from .config import GatewayConfig, WorkerConfig
from .discovery import DnsDiscovery
from .metrics import GatewayMetrics
from .routing_text import RoutingText
from .policies import RouteRequest, Worker, create_policy

log = structlog.get_logger(__name__)

PROXIED = ("/v1/chat/completions", "/v1/completions", "/generate")
RETRY_STATUSES = {502, 503}


class GatewayWorker(Worker):
    """A worker as the gateway tracks it: state from probes and failures, and the models it serves."""

    def __init__(self, name: str, url: str, origin: str = "config"):
        super().__init__(name, url)
        self.origin = origin  # "config" (listed), "engine" (supervised), "admin" (added at run time), "dns"
        self.state = "starting"  # starting → ready ⇄ unhealthy (from probes, failures, the supervisor)
        self.draining = False  # an operator's decision: no new requests; probes do not change it
        self.models: set[str] = set()
        self.failures = 0
        self.successes = 0
        self.last_progress = time.monotonic()  # last byte relayed from it (for the stall watchdog)
        self.consecutive_errors = 0  # connect errors and 5xx answers in a row (the circuit breaker)
        self.open_until = 0.0  # while the breaker is open, no requests, whatever the probes say

    @property
    def routable(self) -> bool:
        return self.state == "ready" and not self.draining and time.monotonic() >= self.open_until

    def set_state(self, state: str, why: str) -> None:
        if state != self.state:
            log.info("gateway.worker_state", worker=self.name, old=self.state, new=state, why=why)
            self.state = state


class Gateway:
    def __init__(self, config: GatewayConfig, seed: int | None = None, supervised: frozenset[str] = frozenset()):
        self.config = config
        # Workers named in `supervised` are the supervisor's engines: a reload or the admin API leaves them be.
        self.workers = [GatewayWorker(w.name or w.url, w.url, "engine" if (w.name or w.url) in supervised else "config")
                        for w in config.workers]
        self.policy = create_policy(config.policy.name, seed, **config.policy.options())
        self.auth = Authenticator(config.auth.keys)
        self.metrics = GatewayMetrics()
        self.routing_text = RoutingText()
        self.queued = 0
        self.admitting = True  # False once shutdown begins: new requests get 503
        # Called with (worker name, why) when probes or the stream watchdog find a ready worker hung;
        # the supervisor kills and restarts its own engines from here.
        self.on_hung: Callable[[str, str], None] | None = None
        self.discovery: DnsDiscovery | None = None
        self._probes: set[asyncio.Task] = set()  # probes of workers added at run time
        self._capacity = asyncio.Condition()  # notified whenever a worker finishes a request
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=config.max_request_bytes,
                                   middlewares=[error_middleware(config.max_request_bytes)])
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)
        r = self.app.router
        for path in PROXIED:
            r.add_post(path, self.proxy)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/ready", self.ready)
        r.add_get("/workers", self.list_workers)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/admin/workers", self.admin_list_workers)
        r.add_post("/admin/workers", self.admin_add_worker)
        r.add_delete("/admin/workers/{name}", self.admin_remove_worker)
        r.add_post("/admin/workers/{name}/drain", self.admin_drain)
        r.add_post("/admin/workers/{name}/undrain", self.admin_drain)

    # ---- lifecycle and health -----------------------------------------------------------------

    async def _start(self, app) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await asyncio.gather(*(self._probe(w) for w in self.workers))
        self._prober = asyncio.create_task(self._probe_forever())
        self._set_discovery(self.config)

    async def _stop(self, app) -> None:
        self._prober.cancel()
        self._set_discovery(None)
        await self.session.close()

    @property
    def inflight(self) -> int:
        return sum(w.inflight for w in self.workers)

    def stop_admitting(self) -> None:
        """Shutdown: requests from now on get 503 (and /ready fails) while those in flight finish."""
        self.admitting = False

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health.interval)
            self._watch_stalls()
            await asyncio.gather(*(self._probe(w) for w in self.workers))

    def _watch_stalls(self) -> None:
        """A worker with requests in flight but no byte for stall_timeout is suspect: take it out."""
        now = time.monotonic()
        for w in self.workers:
            if w.inflight and now - w.last_progress > self.config.health.stall_timeout:
                w.successes = 0
                self._hung(w, f"no bytes for {now - w.last_progress:.1f}s with {w.inflight} in flight")

    def _hung(self, worker: GatewayWorker, why: str) -> None:
        was_ready = worker.state == "ready"
        worker.set_state("unhealthy", why)
        if was_ready and self.on_hung is not None:
            self.on_hung(worker.name, why)

    # ---- supervisor hooks ---------------------------------------------------------------------------

    def worker_exited(self, name: str) -> None:
        """The worker's process died: out of rotation at once, and its cache is gone."""
        worker = self._worker(name)
        worker.set_state("unhealthy", "process exited")
        self.policy.forget(worker)

    def worker_restarted(self, name: str) -> None:
        """A new process with an empty cache: forget its prefixes; probes re-admit it once it is up."""
        worker = self._worker(name)
        worker.models.clear()
        worker.set_state("starting", "process restarted")
        self.policy.forget(worker)

    async def worker_ready(self, name: str) -> bool:
        """The supervisor saw the engine answer /health: learn its models and route to it now."""
        worker = self._worker(name)
        worker.models.clear()
        await self._probe(worker, admit=True)
        return worker.state == "ready"

    def set_draining(self, name: str, draining: bool) -> GatewayWorker:
        worker = self._worker(name)
        worker.draining = draining
        log.info("gateway.worker_draining" if draining else "gateway.worker_undrained", worker=name)
        return worker

    def add_worker(self, name: str, url: str, origin: str) -> GatewayWorker:
        if any(w.name == name for w in self.workers):
            raise APIError(409, f"a worker named {name!r} exists", param="name", code="worker_exists")
        worker = GatewayWorker(name, url, origin)
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
        if config.policy != old.policy:
            options = config.policy.options()
            if config.policy.name != old.policy.name or not self.policy.retune(**options):
                self.policy = create_policy(config.policy.name, None, **options)
                log.info("gateway.policy_replaced", policy=config.policy.name)
        listed = {w.name or w.url: w.url for w in config.workers}
        for w in [w for w in self.workers if w.origin == "config"]:
            if listed.get(w.name) != w.url:
                self.remove_worker(w.name)
        known = {w.name for w in self.workers}
        for name, url in listed.items():
            if name not in known:
                self._probe_soon(self.add_worker(name, url, "config"))
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
        """Probe a new worker now rather than at the next round (the task is kept until it ends)."""
        task = asyncio.get_running_loop().create_task(self._probe(worker))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def _worker(self, name: str) -> GatewayWorker:
        for w in self.workers:
            if w.name == name:
                return w
        raise APIError(404, f"no worker named {name!r}", param="name", code="worker_not_found")

    async def _probe(self, worker: GatewayWorker, admit: bool = False) -> None:
        """One /health probe (and /v1/models until known); `admit` readmits on one success."""
        h = self.config.health
        timeout = aiohttp.ClientTimeout(total=h.timeout)
        try:
            async with self.session.get(worker.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
            if ok and not worker.models:
                async with self.session.get(worker.url + "/v1/models", timeout=timeout) as resp:
                    worker.models = {m["id"] for m in (await resp.json())["data"]}
                await self.routing_text.learn(self.session, worker.url, worker.models, timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            ok = False
        if ok:
            worker.failures, worker.successes = 0, worker.successes + 1
            if worker.state != "ready" and (admit or worker.successes >= h.success_threshold):
                worker.set_state("ready", "supervisor" if admit else "probe")
        else:
            worker.successes, worker.failures = 0, worker.failures + 1
            if worker.state == "starting":
                worker.set_state("unhealthy", "probe")
            elif worker.failures >= h.failure_threshold:
                self._hung(worker, f"{worker.failures} failed probes")

    def _eject(self, worker: GatewayWorker, why: str) -> None:
        """Passive ejection: a connection error takes the worker out until a probe succeeds."""
        worker.successes = 0
        worker.set_state("unhealthy", why)
        self._count_outcome(worker, failed=True)

    def _count_outcome(self, worker: GatewayWorker, failed: bool) -> None:
        """The circuit breaker: `breaker_threshold` failures in a row open it for `breaker_cooldown` s."""
        h = self.config.health
        worker.consecutive_errors = worker.consecutive_errors + 1 if failed else 0
        if worker.consecutive_errors >= h.breaker_threshold:
            worker.open_until = time.monotonic() + h.breaker_cooldown
            worker.consecutive_errors = 0
            log.warning("gateway.circuit_open", worker=worker.name, seconds=h.breaker_cooldown)

    # ---- the request path ---------------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not self.admitting:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        key = self.auth.identify(request)
        body = await read_json(request)
        raw = await request.read()  # cached by aiohttp: forwarded as the client sent it
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        started = time.perf_counter()
        with self.auth.admit(key, body.get("model") if request.path != "/generate" else None):
            resp = await self._route(request, request_id, body, raw, started)
        self.metrics.latency.labels(request.path).observe(time.perf_counter() - started)
        return resp

    async def _route(self, request: web.Request, request_id: str, body: dict, raw: bytes,
                     started: float) -> web.StreamResponse:
        candidates = self._candidates(request.path, body)
        route = RouteRequest(self.routing_text(request.path, body))
        headers = {"Content-Type": "application/json", "x-request-id": request_id}
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout)
        for attempt in range(self.config.max_retries + 1):
            decision = self.policy.choose(await self._with_capacity(candidates), route)
            worker = decision.worker
            reason = "retry" if attempt else decision.reason
            self.metrics.decisions.labels(reason).inc()
            self.metrics.predicted_prefix.inc(decision.matched_bytes)
            if attempt:
                self.metrics.retries.inc()
            worker.inflight += 1
            worker.last_progress = time.monotonic()
            try:
                try:
                    upstream = await self.session.post(worker.url + request.path, data=raw, headers=headers,
                                                       timeout=timeout)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    self._eject(worker, f"connect: {type(exc).__name__}")
                    upstream = None
                if upstream is not None:
                    self._count_outcome(worker, failed=upstream.status >= 500)
                if upstream is not None and (upstream.status not in RETRY_STATUSES
                                             or attempt == self.config.max_retries):
                    self.metrics.ttfb.labels(request.path).observe(time.perf_counter() - started)
                    self.metrics.requests.labels(request.path, str(upstream.status), worker.name).inc()
                    resp = await self._relay(request, upstream, worker, reason, retried=attempt > 0,
                                             request_id=request_id, matched_bytes=decision.matched_bytes)
                    log.info("gateway.request", request_id=request_id, path=request.path, worker=worker.name,
                             route=reason, matched_bytes=decision.matched_bytes, status=upstream.status,
                             seconds=round(time.perf_counter() - started, 4))
                    return resp
                if upstream is not None:
                    upstream.release()
            finally:
                worker.inflight -= 1
                async with self._capacity:
                    self._capacity.notify()
            candidates = [w for w in candidates if w is not worker] or candidates
            await asyncio.sleep(self.config.retry_backoff * (2 ** attempt) * random.uniform(0.5, 1.5))
        raise APIError(502, "no worker could take the request", code="upstream_unavailable",
                       headers={"x-should-retry": "false"})

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
        return [w for w in candidates if w.inflight < limit]

    def _candidates(self, path: str, body: dict) -> list[GatewayWorker]:
        ready = [w for w in self.workers if w.routable]
        if path != "/generate":  # SGLang's native API has no model field
            model = body.get("model")
            if not isinstance(model, str):
                raise bad_request("model: a model name is required", "model", "missing_model")
            served = {m for w in self.workers for m in w.models}
            if model not in served:
                raise APIError(404, f"model {model!r} is not served here; available: {sorted(served)}",
                               param="model", code="model_not_found")
            ready = [w for w in ready if model in w.models]
        if not ready:
            raise APIError(503, "no worker is ready", code="no_ready_worker", headers={"Retry-After": "2"})
        return ready

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, worker: GatewayWorker,
                     reason: str, retried: bool, request_id: str, matched_bytes: int) -> web.StreamResponse:
        """Pass the upstream response through as bytes; a broken upstream stream ends with an error event."""
        headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json"),
                   "x-sglang-gw-worker": worker.name, "x-sglang-gw-route": reason, "x-request-id": request_id,
                   "x-sglang-gw-matched-bytes": str(matched_bytes)}
        if retried:
            headers["x-should-retry"] = "false"  # we already failed over: the SDK must not multiply retries
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        # A JSON (non-streamed) answer is small: keep a copy to read the cached tokens the engine reports.
        kept = [] if headers["Content-Type"].startswith("application/json") else None
        try:
            async for chunk in upstream.content.iter_any():
                worker.last_progress = time.monotonic()
                await resp.write(chunk)
                if kept is not None:
                    kept.append(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            self._eject(worker, f"stream: {type(exc).__name__}")
            error = {"error": {"message": f"upstream {worker.name} failed mid-response", "type": "upstream_error",
                               "param": None, "code": "upstream_failed"}}
            await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        finally:
            upstream.close()  # on a client disconnect this drops the engine connection: it aborts the request
        await resp.write_eof()
        if kept is not None and upstream.status == 200:
            self.metrics.reported_cached.inc(reported_cached_tokens(b"".join(kept)))
        return resp

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
        return web.Response(body=self.metrics.render(self.workers, self.policy), content_type="text/plain",
                            charset="utf-8")

    async def list_workers(self, request: web.Request) -> web.Response:
        self.auth.identify(request)
        return self._workers_response()

    def _workers_response(self) -> web.Response:
        return web.json_response({"workers": [
            {"name": w.name, "url": w.url, "origin": w.origin, "state": w.state, "draining": w.draining,
             "inflight": w.inflight, "models": sorted(w.models),
             "prefix_bytes": self.policy.tracked_bytes(w)}
            for w in self.workers]})


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
            err = exc.errors()[0]
            raise bad_request(f"{'.'.join(map(str, err['loc']))}: {err['msg']}", str(err["loc"][0])) from None
        worker = self.add_worker(spec.name or spec.url, spec.url, "admin")
        await self._probe(worker)
        return web.json_response({"name": worker.name, "state": worker.state}, status=201)

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
        return web.json_response({"name": worker.name, "draining": worker.draining, "inflight": worker.inflight})


def reported_cached_tokens(body: bytes) -> int:
    """cached_tokens from an OpenAI usage or SGLang meta_info (0 when absent)."""
    try:
        data = json.loads(body)
    except ValueError:
        return 0
    items = data if isinstance(data, list) else [data]
    total = 0
    for item in items:
        if not isinstance(item, dict):
            continue
        usage = item.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        total += int(details.get("cached_tokens") or (item.get("meta_info") or {}).get("cached_tokens") or 0)
    return total


async def serve(config: GatewayConfig) -> int:
    gateway = Gateway(config)
    runner = web.AppRunner(gateway.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    log.info("gateway.listening", host=config.host, port=config.port, policy=config.policy.name,
             workers=[w.url for w in config.workers])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
