"""The supervisor: owns the local engine processes and keeps the gateway's picture of them exact.

Each engine slot runs one loop, which reads like the policy:

    spawn → wait until its health path answers (or the process exits, or startup_timeout) → admit to routing
    → wait for the process to exit → eject from routing at once, forget its prefixes, kill what it left
    → planned restart: spawn again now; crash or hang: count it, and either wait out an exponential
      backoff or, at max_restarts within restart_window, hold the slot out until an operator restarts it.

Hung engines are found by the gateway and killed here; the loop then restarts them like any crash.
Busy is not hung: the gateway calls an engine hung on evidence that it makes no progress (its
scheduler's heartbeat, failed /health answers) or when this supervisor finds its process stopped
(SIGSTOP), never because probes were slow (gateway/health.py). A rolling restart drains one engine at a time and only takes the
next one down once every other engine is ready again.

Invariant: a slot's phase is "ready" only while its process runs and the gateway routes to it;
every process exit passes through `gateway.worker_exited` before anything else happens to the slot.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Counter, Gauge

from ..config import ServeConfig, SupervisorConfig
from ..errors import APIError
from ..gateway.app import Gateway
from .engines import EngineSpec, is_stopped, kill_leftovers, relay_logs, spawn

log = structlog.get_logger(__name__)

PHASES = ("starting", "ready", "stopping", "backoff", "held_out", "stopped")


class EngineSlot:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.phase = "stopped"
        self.process: asyncio.subprocess.Process | None = None
        self.crashes: deque[float] = deque()  # times of unplanned exits inside restart_window
        self.restarts = 0
        self.last_exit: str | None = None
        self.planned: str | None = None  # why we are ending the current process ourselves
        self.relay: asyncio.Task | None = None  # copies the process's output into our logs
        self.ready = asyncio.Event()  # set while phase == "ready"
        self.release = asyncio.Event()  # an operator's restart of a held-out slot


class Supervisor:
    def __init__(self, config: ServeConfig, gateway: Gateway, specs: list[EngineSpec]):
        self.settings: SupervisorConfig = config.supervisor
        self.gateway = gateway
        self.slots = {s.name: EngineSlot(s) for s in specs}
        self.stopping = False
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._rolling: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None
        gateway.on_hung = self._on_hung
        gateway.process_stopped = self._process_stopped
        gateway.status.local_engines = self.describe_engines  # phases and restarts on the status page
        r = gateway.metrics.registry
        self.m_restarts = Counter("sglang_gw_engine_restarts", "engine restarts by reason", ["engine", "reason"],
                                  registry=r)
        self.m_phase = Gauge("sglang_gw_engine_phase", "1 for the engine's current phase", ["engine", "phase"],
                             registry=r)
        router = gateway.app.router
        router.add_get("/engines", self.list_engines)
        router.add_post("/admin/engines/restart", self.admin_rolling_restart)
        router.add_post("/admin/engines/{name}/restart", self.admin_restart_one)
        for slot in self.slots.values():
            self._set_phase(slot, "stopped")

    # ---- the loop of one slot -----------------------------------------------------------------------

    def start(self) -> None:
        # Readiness polls wait as long as the gateway's probes do.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.gateway.config.health.timeout))
        self._tasks = [asyncio.create_task(self._run(slot)) for slot in self.slots.values()]

    async def _run(self, slot: EngineSlot) -> None:
        while not self.stopping:
            process = slot.process = await spawn(slot.spec)
            slot.relay = asyncio.create_task(relay_logs(slot.spec.name, process))
            self._set_phase(slot, "starting")
            log.info("supervisor.engine_started", engine=slot.spec.name, pid=process.pid, gpu=slot.spec.gpu)
            if await self._wait_ready(slot, process):
                await self.gateway.worker_ready(slot.spec.name)
                self._set_phase(slot, "ready")
                slot.ready.set()
            code = await process.wait()
            started_ok = slot.ready.is_set()
            slot.ready.clear()
            self.gateway.worker_exited(slot.spec.name)  # ejected before anything else happens
            kill_leftovers(process.pid)
            reason = slot.planned or ("crashed" if started_ok else "crashed_at_start")
            slot.planned = None
            slot.last_exit = f"{_exit_status(code)} ({reason.replace('_', ' ')})"
            log.warning("supervisor.engine_exited", engine=slot.spec.name, pid=process.pid, exit=slot.last_exit)
            if self.stopping:
                break
            slot.restarts += 1
            self.m_restarts.labels(slot.spec.name, reason).inc()
            if reason != "restart" and not await self._backoff(slot):
                break
            self.gateway.worker_restarted(slot.spec.name)
        self._set_phase(slot, "stopped")

    def _startup_timeout(self, slot: EngineSlot) -> float:
        return slot.spec.startup_timeout or self.settings.startup_timeout

    async def _wait_ready(self, slot: EngineSlot, process) -> bool:
        """Poll the health path until 200; False if the process exits or does not get there in time."""
        deadline = time.monotonic() + self._startup_timeout(slot)
        exited = asyncio.ensure_future(process.wait())
        try:
            while time.monotonic() < deadline:
                try:
                    async with self.session.get(slot.spec.url + slot.spec.health_path) as resp:
                        if resp.status == 200:
                            return True
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                done, _ = await asyncio.wait({exited}, timeout=0.1)
                if done or self.stopping:
                    return False
            slot.planned = "startup_timeout"
            log.error("supervisor.engine_startup_timeout", engine=slot.spec.name,
                      seconds=self._startup_timeout(slot), health=slot.spec.url + slot.spec.health_path)
            process.kill()
            return False
        finally:
            exited.cancel()

    async def _backoff(self, slot: EngineSlot) -> bool:
        """Count the crash; wait before the restart, or hold a flapping slot out. False: stop the loop."""
        s = self.settings
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - s.restart_window:
            slot.crashes.popleft()
        if len(slot.crashes) >= s.max_restarts:
            self._set_phase(slot, "held_out")
            log.error("supervisor.engine_held_out", engine=slot.spec.name, crashes=len(slot.crashes),
                      window_s=s.restart_window, last_exit=slot.last_exit,
                      hint=f"fix the cause, then POST /admin/engines/{slot.spec.name}/restart")
            slot.release.clear()
            await slot.release.wait()
            slot.crashes.clear()
            return not self.stopping
        delay = min(s.restart_backoff * 2 ** (len(slot.crashes) - 1), s.restart_backoff_max)
        self._set_phase(slot, "backoff")
        log.info("supervisor.engine_restart_scheduled", engine=slot.spec.name, delay_s=round(delay, 3))
        try:
            await asyncio.wait_for(self._stopped.wait(), delay)
        except asyncio.TimeoutError:
            pass
        return not self.stopping

    def _on_hung(self, name: str, why: str) -> None:
        slot = self.slots.get(name)
        if slot is None:
            log.warning("supervisor.remote_worker_unhealthy", worker=name, why=why)  # not ours to restart
            return
        if self.settings.kill_hung and slot.phase == "ready" and slot.process is not None:
            log.warning("supervisor.engine_hung", engine=name, pid=slot.process.pid, why=why)
            slot.planned = "hung"
            slot.process.kill()

    def _process_stopped(self, name: str) -> bool | None:
        """For the gateway's probe rounds: whether a local engine's process is stopped; None for a
        worker that is not ours."""
        slot = self.slots.get(name)
        if slot is None:
            return None
        process = slot.process
        return process is not None and process.returncode is None and is_stopped(process.pid)

    def _set_phase(self, slot: EngineSlot, phase: str) -> None:
        slot.phase = phase
        for p in PHASES:
            self.m_phase.labels(slot.spec.name, p).set(1 if p == phase else 0)

    # ---- planned restarts ---------------------------------------------------------------------------

    async def restart(self, name: str) -> None:
        """Drain one engine (no new requests; in-flight ones finish), restart it, wait until it serves."""
        slot = self.slots[name]
        if slot.phase == "held_out":
            slot.release.set()
        elif slot.phase == "ready":
            worker = self.gateway.set_draining(name, True)
            deadline = time.monotonic() + self.settings.drain_timeout
            while worker.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            slot.planned = "restart"
            await self._terminate(slot)
        await asyncio.wait_for(slot.ready.wait(), self._startup_timeout(slot))
        self.gateway.set_draining(name, False)

    async def rolling_restart(self) -> list[str]:
        """Every engine in turn; the next goes down only when all the others are serving again."""
        done = []
        for name, slot in self.slots.items():
            others = [s for s in self.slots.values() if s is not slot and s.phase != "held_out"]
            await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in others)),
                                   max(map(self._startup_timeout, others), default=self.settings.startup_timeout))
            log.info("supervisor.rolling_restart_step", engine=name)
            await self.restart(name)
            done.append(name)
        log.info("supervisor.rolling_restart_done", engines=done)
        return done

    async def _terminate(self, slot: EngineSlot) -> None:
        """SIGTERM (the engine drains), then SIGKILL after engine_stop_timeout."""
        process = slot.process
        if process is None or process.returncode is not None:
            return
        self._set_phase(slot, "stopping")
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self.settings.engine_stop_timeout)
        except asyncio.TimeoutError:
            log.warning("supervisor.engine_kill", engine=slot.spec.name, pid=process.pid)
            process.kill()

    async def stop(self) -> None:
        self.stopping = True
        self._stopped.set()
        for slot in self.slots.values():
            slot.planned = "shutdown"
            slot.release.set()
        await asyncio.gather(*(self._terminate(slot) for slot in self.slots.values()))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._rolling is not None:
            self._rolling.cancel()
        if self.session is not None:
            await self.session.close()

    def reload(self, config: ServeConfig, specs: list[EngineSpec]) -> tuple[bool, str]:
        """New supervisor settings apply now; new engine flags at each engine's next (re)start.
        Returns (whether the engine part was taken, what it means for the operator)."""
        self.settings = config.supervisor
        current = [slot.spec for slot in self.slots.values()]
        if [(s.name, s.url, s.gpu) for s in specs] != [(s.name, s.url, s.gpu) for s in current]:
            return False, "engine layout changed (count, GPUs or ports): restart serve to apply; engines unchanged"
        if specs == current:
            return True, "engines unchanged"
        for spec in specs:
            self.slots[spec.name].spec = spec
        return True, "engine flags changed: they apply at each engine's next restart (rolling: sglang-gw restart)"

    def summary(self) -> dict[str, int]:
        phases = [slot.phase for slot in self.slots.values()]
        return {p: phases.count(p) for p in PHASES if p in phases}

    # ---- HTTP: /engines and the admin endpoints -------------------------------------------------------

    async def list_engines(self, request: web.Request) -> web.Response:
        self.gateway.auth.identify(request)
        return web.json_response({"rolling_restart": self._rolling is not None and not self._rolling.done(),
                                  "engines": self.describe_engines()})

    def describe_engines(self) -> list[dict]:
        return [self._describe(slot) for slot in self.slots.values()]

    def _describe(self, slot: EngineSlot) -> dict:
        return {"name": slot.spec.name, "url": slot.spec.url, "gpu": slot.spec.gpu, "phase": slot.phase,
                "pid": slot.process.pid if slot.process and slot.process.returncode is None else None,
                "restarts": slot.restarts, "recent_crashes": len(slot.crashes), "last_exit": slot.last_exit}

    async def admin_rolling_restart(self, request: web.Request) -> web.Response:
        self.gateway.require_admin(request)
        if self._rolling is not None and not self._rolling.done():
            raise APIError(409, "a rolling restart is already running", code="restart_in_progress")
        self._rolling = asyncio.create_task(self.rolling_restart())
        if request.query.get("wait") in ("1", "true"):
            try:
                return web.json_response({"restarted": await asyncio.shield(self._rolling)})
            except asyncio.TimeoutError:
                raise APIError(504, "an engine did not come back within startup_timeout",
                               code="restart_timeout") from None
        return web.json_response({"started": True, "engines": list(self.slots)}, status=202)

    async def admin_restart_one(self, request: web.Request) -> web.Response:
        self.gateway.require_admin(request)
        name = request.match_info["name"]
        if name not in self.slots:
            raise APIError(404, f"no local engine named {name!r}", param="name", code="engine_not_found")
        try:
            await self.restart(name)
        except asyncio.TimeoutError:
            raise APIError(504, f"{name} did not come back within startup_timeout", code="restart_timeout") from None
        return web.json_response(self._describe(self.slots[name]))


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
