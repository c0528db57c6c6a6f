"""The live status page: GET /status (static HTML, CSS and JS from gateway/static/) and the one JSON
document it polls, GET /status.json (behind the admin key unless `status.open`).

The document is assembled from what the gateway already knows — its workers, their health, requests in
flight and queued, the routing policy's decisions, the supervisor's phases and restarts when it runs
under `serve` — plus the engines' own figures (running and queued requests, KV use, tokens, cache hits,
TTFT), read from their /metrics only while someone polls: at most once per half refresh interval,
shared by every open page. Recent attempts come from Gateway._book (a relay's over its link) into
bounded rings; rates and percentiles are counted here over a sliding window, never read back from
Prometheus text.

The page polls rather than holding an event stream: EventSource cannot send the admin key's header.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from .health import State

if TYPE_CHECKING:
    from .app import Gateway, GatewayWorker, Reply
    from .request_path import Outcome

STATIC = Path(__file__).with_name("static")
WINDOW_S = 60.0  # the rates' and percentiles' sliding window (Prometheus dashboards use rate(…[1m]) alike)
RECENT = 50  # routing decisions and errors kept for the page
# Attempts kept for the window's rates: past this many in WINDOW_S the rates span the newest ones only.
WINDOW_LIMIT = 20_000
# The page runs only its own files: no inline script or style, nothing fetched from elsewhere.
PAGE_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"

# SGLang's metric names, as any SGLang-compatible engine exports them (ours: engine/metrics.py). The
# gateway reads them from text and imports nothing of the engine (that would load torch into it).
ENGINE_GAUGES = {"running": "sglang:num_running_reqs", "queued": "sglang:num_queue_reqs",
                 "token_usage": "sglang:token_usage"}
ENGINE_COUNTERS = {"generated": "sglang:generation_tokens_total", "prompt": "sglang:prompt_tokens_total",
                   "cached": "sglang:cached_tokens_total", "ttft_sum": "sglang:time_to_first_token_seconds_sum",
                   "ttft_count": "sglang:time_to_first_token_seconds_count"}


@dataclass(slots=True)  # not frozen: made per attempt (policies/base.py says why)
class Attempt:
    """One attempt as the page shows it: the routing decision and how it ended."""

    at: float  # epoch seconds
    path: str
    worker: str
    route: str  # the policy's reason (cache_hit, miss, load_guard, …), or retry / failover
    matched_bytes: int
    status: int | None  # the worker's HTTP status; None when it never answered
    ttfb_s: float | None  # seconds from the request's arrival to the worker's first answer byte
    why: str  # why it failed; empty when it did not

    @classmethod
    def of(cls, path: str, outcome: Outcome, started: float) -> Attempt:
        answered = outcome.response is not None
        return cls(at=time.time(), path=path, worker=outcome.decision.worker.name, route=outcome.route,
                   matched_bytes=outcome.decision.matched_bytes, status=outcome.status,
                   ttfb_s=outcome.answered_at - started if answered else None, why=outcome.failure)

    @property
    def failed(self) -> bool:
        return self.status is None or self.status >= 500 or bool(self.why)


class Window:
    """What happened in the last `seconds`: timestamped values, at most `limit` of them."""

    def __init__(self, seconds: float, limit: int, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._started = clock()
        self._events: deque[tuple[float, object]] = deque(maxlen=limit)

    def add(self, value: object) -> None:
        self._events.append((self._clock(), value))

    def current(self) -> tuple[list, float]:
        """The values inside the window, and the seconds they stand for: the window, or less just after
        the start or when the limit dropped older values."""
        now = self._clock()
        while self._events and self._events[0][0] < now - self.seconds:
            self._events.popleft()
        if len(self._events) == self._events.maxlen:
            span = now - self._events[0][0]
        else:
            span = min(self.seconds, now - self._started)
        return [value for _, value in self._events], max(span, 1e-6)


class EngineSamples:
    """One engine's /metrics figures, sampled while the page is watched; rates between the oldest
    sample in the window and the newest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self.gauges: dict[str, float] = {}
        self.error = ""  # why the last read failed; empty when it did not

    def read(self, reply: Reply) -> None:
        """One reply of the engine's /metrics: sampled, or why not in `error`."""
        if not reply.ok or not isinstance(reply.body, str):
            self.error = reply.failure()
            return
        try:
            values = _sample_sums(reply.body)
        except ValueError as exc:
            self.error = f"unreadable /metrics: {exc}"
            return
        now = self._clock()
        self.gauges = {key: values[name] for key, name in ENGINE_GAUGES.items() if name in values}
        counters = {key: values[name] for key, name in ENGINE_COUNTERS.items() if name in values}
        if self._samples and any(counters.get(k, 0) < v for k, v in self._samples[-1][1].items()):
            self._samples.clear()  # a counter went back: a new engine process, its counts from zero
        self._samples.append((now, counters))
        while len(self._samples) > 2 and self._samples[0][0] < now - WINDOW_S:
            self._samples.popleft()
        self.error = ""

    def figures(self) -> dict:
        """Gauges as last read; tokens/s, cache hit rate and mean TTFT over the window (None until two
        samples, or with nothing to divide by)."""
        figures = {key: self.gauges.get(key) for key in ENGINE_GAUGES}
        delta: dict[str, float] = {}
        seconds = 0.0
        if len(self._samples) >= 2:
            (then, old), (now, new) = self._samples[0], self._samples[-1]
            # A labelled counter or histogram has no sample until its first count: absent is zero.
            delta, seconds = {k: v - old.get(k, 0.0) for k, v in new.items()}, now - then
        figures["tokens_per_s"] = delta["generated"] / seconds if "generated" in delta and seconds > 0 else None
        figures["cache_hit_rate"] = _ratio(delta.get("cached"), delta.get("prompt"))
        figures["ttft_s"] = _ratio(delta.get("ttft_sum"), delta.get("ttft_count"))
        figures["load_error"] = self.error
        return figures


class StatusPage:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        # The supervisor's view of its engines (name, phase, pid, restarts, last exit), set by it under
        # `serve`; a gateway alone has none.
        self.local_engines: Callable[[], list[dict]] = lambda: []
        self.window = Window(WINDOW_S, WINDOW_LIMIT)
        self.decisions: deque[Attempt] = deque(maxlen=RECENT)
        self.errors: deque[Attempt] = deque(maxlen=RECENT)
        self.engines: dict[str, EngineSamples] = {}
        self._reading: asyncio.Future | None = None  # the engines' /metrics being read, shared by every poll
        self._read_at = 0.0

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/status", self.page)
        router.add_static("/status/static/", STATIC)
        router.add_get("/status.json", self.document)
        router.add_get("/status/access", self.access)

    # ---- fed by the request path ----------------------------------------------------------------------

    def attempted(self, attempt: Attempt) -> None:
        """One attempt, as Gateway._book sees it (a stream's once its first byte is in)."""
        self.window.add(attempt)
        self.decisions.append(attempt)
        if attempt.failed:
            self.errors.append(attempt)

    # ---- HTTP -------------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.FileResponse:
        """The page itself: no data in it, so served without a key (it asks for one when the JSON needs it)."""
        return web.FileResponse(STATIC / "status.html", headers={"Content-Security-Policy": PAGE_POLICY,
                                                                 "Cache-Control": "no-cache"})

    async def access(self, request: web.Request) -> web.Response:
        """Whether /status.json needs the admin key: the page asks first, rather than drawing a 401."""
        return web.json_response({"open": self.gateway.config.status.open}, headers={"Cache-Control": "no-store"})

    async def document(self, request: web.Request) -> web.Response:
        if not self.gateway.config.status.open:
            self.gateway.require_admin(request)
        await self._read_engines()
        return web.json_response(self.snapshot(), headers={"Cache-Control": "no-store"})

    # ---- the document -----------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        g = self.gateway
        attempts, span = self.window.current()
        answered = sorted(a.ttfb_s for a in attempts if a.ttfb_s is not None)
        engines = {e["name"]: e for e in self.local_engines()}
        distrusted = g.cache_ledger.distrusted()
        workers = [self._worker(w, engines.get(w.name, {}), distrusted) for w in g.workers]
        rates = [w["tokens_per_s"] for w in workers if w["tokens_per_s"] is not None]
        routes: dict[str, int] = {}
        for a in attempts:
            routes[a.route] = routes.get(a.route, 0) + 1
        return {
            "now": time.time(),
            "refresh_s": g.config.status.refresh,
            "window_s": round(span, 1),
            "fleet": {
                "admitting": g.admitting,
                "policy": g.config.policy.name,
                "ready_workers": sum(w.routable for w in g.workers),
                "workers": len(g.workers),
                "inflight": g.inflight,
                "queued": g.queued,
                "answers_per_s": len(answered) / span,
                "errors_per_s": sum(a.failed for a in attempts) / span,
                "ttfb_p50_s": _percentile(answered, 0.5),
                "ttfb_p95_s": _percentile(answered, 0.95),
                "tokens_per_s": sum(rates) if rates else None,
                "routes": routes,
            },
            "workers": workers,
            "decisions": [_attempt_row(a) for a in reversed(self.decisions)],
            "errors": [_attempt_row(a) for a in reversed(self.errors)],
        }

    def _worker(self, w: GatewayWorker, engine: dict, distrusted: frozenset[str]) -> dict:
        """One worker's row: the gateway's view (as /workers gives it), the supervisor's (`engine`, empty
        for a worker that is not a local engine) and the engine's own figures."""
        g = self.gateway
        return {
            **g.describe_worker(w), "routable": w.routable,
            "phase": engine.get("phase"), "restarts": engine.get("restarts"), "pid": engine.get("pid"),
            "last_exit": engine.get("last_exit"),
            "prediction_payoff": g.cache_ledger.payoff(w.name),
            "prediction_distrusted": w.name in distrusted,
            **self.engines.get(w.name, EngineSamples()).figures(),
        }

    # ---- the engines' figures ---------------------------------------------------------------------------

    async def _read_engines(self) -> None:
        """The ready workers' /metrics, read once for every poll that comes within half a refresh."""
        now = time.monotonic()
        stale = now - self._read_at >= self.gateway.config.status.refresh / 2
        if self._reading is None or (self._reading.done() and stale):
            self._read_at = now
            self._reading = asyncio.ensure_future(self._read_all())
        await asyncio.shield(self._reading)  # a page that goes away does not cancel the others' read

    async def _read_all(self) -> None:
        """Draining workers included (they still run requests); a worker that is not ready loses its
        samples: what it reported no longer stands, and a new process counts from zero."""
        g = self.gateway
        ready = [w for w in g.workers if w.health.state is State.READY]
        for gone in set(self.engines) - {w.name for w in ready}:
            del self.engines[gone]
        replies = await g.call_all(ready, "GET", "/metrics", timeout=g.config.health.timeout)
        for name, reply in replies.items():
            self.engines.setdefault(name, EngineSamples()).read(reply)


def _attempt_row(attempt: Attempt) -> dict:
    return dict(asdict(attempt), failed=attempt.failed)


def _sample_sums(text: str) -> dict[str, float]:
    """Each sample name's value summed over its labels (an engine labels by model_name only)."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def _ratio(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


def _percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted values; None of nothing."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
