"""`sglang-gw serve config.yaml`: the gateway and the supervisor in one process, the engines its children.

start: listen at once (requests get 503 until an engine is ready) → spawn every engine → READY=1 to
systemd once the gateway and at least one engine serve. SIGTERM/SIGINT: stop admitting, let in-flight
requests finish within supervisor.shutdown_grace, stop the engines, exit 0. SIGHUP: reload the file —
keys, limits, policy parameters, health settings, remote workers and discovery apply at once; engine
flags at each engine's next restart; a new engine layout or listen address needs a restart (logged).
"""

from __future__ import annotations

import asyncio
import signal
import time

import structlog

from ..gateway.relays import serving
from ..config import ConfigError, ServeConfig, load_serve_config
from ..gateway.app import Gateway
from ..gateway.config import WorkerConfig
from . import sd_notify
from .engines import EngineSpec, loopback, plan_engines
from .supervisor import Supervisor

log = structlog.get_logger(__name__)


class ServeRuntime:
    def __init__(self, config: ServeConfig, path: str, overrides: list[str]):
        self.path, self.overrides = path, overrides
        self.config = config
        self.specs = plan_engines(config)
        self.listen = (config.gateway.host, config.gateway.port)  # a reload cannot move the socket
        self.gateway = Gateway(config.gateway_config(self._local_workers(self.specs)),
                               supervised=frozenset(s.name for s in self.specs))
        self.supervisor = Supervisor(config, self.gateway, self.specs)
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.status = ""

    @staticmethod
    def _local_workers(specs: list[EngineSpec]) -> list[WorkerConfig]:
        return [WorkerConfig(url=s.url, name=s.name, health_path=s.health_path) for s in specs]

    @property
    def address(self) -> str:
        host, port = self.listen
        return f"http://{loopback(host)}:{port}"

    async def run(self) -> int:
        async with serving(self.gateway, *self.listen) as stop:
            self._print_banner()
            self.supervisor.start()
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
            watch = asyncio.create_task(self._watch())
            await stop.wait()

            log.info("serve.stopping", inflight=self.gateway.inflight,
                     grace_s=self.config.supervisor.shutdown_grace)
            sd_notify.notify("STOPPING=1", "STATUS=stopping: finishing in-flight requests")
            self.gateway.stop_admitting()
            deadline = time.monotonic() + self.config.supervisor.shutdown_grace
            while self.gateway.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.gateway.inflight:
                log.warning("serve.grace_expired", inflight=self.gateway.inflight)
        await self.supervisor.stop()
        watch.cancel()
        log.info("serve.stopped")
        return 0

    async def _watch(self) -> None:
        """Keep systemd's STATUS= line current, send READY=1 once, and WATCHDOG=1 while the loop lives."""
        heartbeat = sd_notify.watchdog_interval()
        last_beat = 0.0
        while True:
            routable = sum(w.routable for w in self.gateway.workers)
            if self.ready_at is None and routable:
                self.ready_at = time.monotonic()
                seconds = round(self.ready_at - self.started, 2)
                log.info("serve.ready", seconds=seconds, workers=routable)
                print(f"sglang-gw: ready after {seconds} s ({routable} worker(s) serving)", flush=True)
                sd_notify.notify("READY=1")
            status = self._status_line(routable)
            if status != self.status:
                self.status = status
                sd_notify.notify(f"STATUS={status}")
            if heartbeat and time.monotonic() - last_beat >= heartbeat:
                last_beat = time.monotonic()
                sd_notify.notify("WATCHDOG=1")
            await asyncio.sleep(0.25)

    def _status_line(self, routable: int) -> str:
        phases = self.supervisor.summary()
        engines = f"{phases.get('ready', 0)}/{len(self.specs)} engines ready"
        held = f", {phases['held_out']} held out" if phases.get("held_out") else ""
        remote = len(self.gateway.workers) - len(self.specs)
        extra = f", {routable - phases.get('ready', 0)}/{remote} remote ready" if remote else ""
        return f"{engines}{held}{extra}; listening on {self.address}"

    def reload(self) -> None:
        try:
            config = load_serve_config(self.path, self.overrides)
        except ConfigError as exc:
            log.error("serve.reload_rejected", error=str(exc), hint="the running config is unchanged")
            return
        sd_notify.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        taken, engines = self.supervisor.reload(config, plan_engines(config))
        current = [slot.spec for slot in self.supervisor.slots.values()]
        restart = self.gateway.reload(config.gateway_config(self._local_workers(current)))
        self.config = config if taken else config.model_copy(update={"engines": self.config.engines})
        log.info("serve.reloaded", engines=engines, keys=len(config.gateway.auth.keys), policy=config.gateway.policy.name,
                 remote_workers=len(config.remote_workers),
                 needs_restart=[f"gateway.{f}" for f in restart] or None)
        sd_notify.notify("READY=1")

    def _print_banner(self) -> None:
        models = sorted({g.served_model for g in self.config.engines if g.served_model}) or ["<model>"]
        body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}' % models[0])
        key = '"<your key>"' if self.config.gateway.auth.keys or self.config.gateway.auth.keys_file else '"none"'
        print(f"sglang-gw: gateway on {self.address} - {len(self.specs)} local engine(s) starting, "
              f"{len(self.config.remote_workers)} remote; models: {', '.join(models)}\n"
              f"  OpenAI SDK: OpenAI(base_url=\"{self.address}/v1\", api_key={key})\n"
              f"  curl:       curl {self.address}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
              f"  status:     curl {self.address}/workers ; curl {self.address}/engines", flush=True)


async def run_serve(config: ServeConfig, path: str, overrides: list[str]) -> int:
    """Run until SIGTERM/SIGINT; `path` and `overrides` are read again on SIGHUP."""
    return await ServeRuntime(config, path, overrides).run()
