"""The gateway process's side of its relays (`gateway.processes` > 1; gateway/relay.py is the other).

It starts the relay processes and restarts any that exits, serves its own app on a Unix socket for the
paths the relays pass through, and answers each relay's link (relay_link.py) from the one routing state:
admissions under the key limits, choices and their leases, the health events of leased workers, and
the attempts to book. A relay's leases and admissions are its link's: when a relay dies, they are
released at once, so a dead relay holds no share of any worker's load or of any key's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

import structlog

from ..errors import APIError
from ..logs import configured
from ..serving import CannotListen, listening, settle_heap

from .cache_prediction import Usage
from .config import GatewaySettings
from .health import Trial
from .policies import Blocks, Decision, RouteRequest, Worker
from .relay_link import HEALTH_EVENTS, Link
from .request_path import AtCapacity, shutting_down
from .status import Attempt

if TYPE_CHECKING:
    from .app import Gateway, GatewayWorker

log = structlog.get_logger(__name__)

RESTART_DELAY_S = 1.0  # before a relay that exited is started again
START_TIMEOUT_S = 60.0  # for every relay to listen, at the start
# A relay's shutdown: its aiohttp runner waits up to 60 s for the requests it holds (as the gateway's own does
# with processes: 1); past that margin more it is killed.
RELAY_STOP_S = 70.0


class RelayEnd(Link):
    """The gateway's end of one relay's link."""

    def __init__(self, relays: Relays):
        super().__init__()
        self.relays, self.gateway = relays, relays.gateway
        self.index: int | None = None  # which relay, once it says hello
        self.leases: dict[int, tuple[GatewayWorker, Trial | None]] = {}
        self.admissions: dict[int, contextlib.AbstractContextManager] = {}
        self._choosing: dict[int, asyncio.Task] = {}  # choices waiting (for capacity), by the relay's question
        self._handlers = {name.removeprefix("_on_"): getattr(self, name) for name in dir(self)
                          if name.startswith("_on_")}

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.send(self.relays.settings())

    def received(self, m: dict) -> None:
        try:
            self._handlers[m["t"]](m)
        except Exception:  # noqa: BLE001 — one bad message must not drop the relay's link and its requests
            log.exception("gateway.relay_message_failed", relay=self.index, kind=m.get("t"))

    # The gateway's request-path hooks (request_path.py) are the routing state's API: a relay's messages call
    # the same ones the gateway's own requests do. One method per kind of message (relay_link.py lists them).

    def _on_choose(self, m: dict) -> None:
        # A request's first choice admits it here, before any later message of the link (its "end") is read.
        if not m["tried"] and not self._admitted(m):
            return
        try:
            route = RouteRequest("", bytes.fromhex(m["s"]) if m["s"] else None, m["b"],
                                 blocks=Blocks(*m["bl"]) if m["bl"] else None)
            choice = self.gateway.choose_now(m["m"], set(m["tried"]), route)
        except Exception as exc:  # noqa: BLE001 — refused (or failed) to the relay
            self._choice_failed(m, exc)
            return
        if isinstance(choice, AtCapacity):  # waits in the gateway's queue, in a task the relay may cancel
            task = self._choosing[m["q"]] = asyncio.get_running_loop().create_task(self._choose_queued(m, choice,
                                                                                                        route))
            task.add_done_callback(lambda _: self._choosing.pop(m["q"], None))
        else:
            self._chosen(m, choice)

    async def _choose_queued(self, m: dict, full: AtCapacity, route: RouteRequest) -> None:
        try:
            choice = await self.gateway.choose_queued(full, route)
        except Exception as exc:  # noqa: BLE001 — refused (or failed) to the relay
            self._choice_failed(m, exc)
            return
        if not self.closed.done():  # a relay gone while its request waited for capacity takes no lease
            self._chosen(m, choice)

    def _chosen(self, m: dict, decision: Decision | None) -> None:
        if decision is None:
            self.send({"t": "chosen", "q": m["q"]})
            return
        lease = next(self.relays.lease_ids)
        self.leases[lease] = (decision.worker, self.gateway._lease(decision.worker))
        self.send({"t": "chosen", "q": m["q"], "lease": lease, "w": decision.worker.name, "u": decision.worker.url,
                   "r": decision.reason, "mb": decision.matched_bytes, "pb": decision.prompt_bytes})

    def _choice_failed(self, m: dict, exc: Exception) -> None:
        if not isinstance(exc, APIError):  # an unexpected one is a 500, as the error middleware makes it
            log.exception("gateway.relay_choice_failed", relay=self.index)  # (called in its except block)
            exc = APIError(500, f"internal error: {exc}", code="internal_error")
        if not m["tried"]:
            self._end(m["a"])
        self._refuse(m, exc)

    def _on_cancel(self, m: dict) -> None:  # its client left while the choice waited for capacity
        if (task := self._choosing.get(m["q"])) is not None:
            task.cancel()

    def _on_ev(self, m: dict) -> None:
        if (lease := self.leases.get(m["l"])) is not None and m["e"] in HEALTH_EVENTS:
            event = getattr(lease[0].health, m["e"])
            event() if m["v"] is None else event(m["v"])

    def _on_release(self, m: dict) -> None:
        if (lease := self.leases.pop(m["l"], None)) is not None:
            self.gateway.release_soon(*lease)

    def _on_end(self, m: dict) -> None:
        self._end(m["a"])

    def _on_rec(self, m: dict) -> None:
        attempt = Attempt(at=m["at"], path=m["p"], worker=m["w"], route=m["route"], matched_bytes=m["mb"],
                          status=m["st"], ttfb_s=m["ttfb"], why=m["why"])
        self.gateway._book(attempt, self._decision(m), _usage(m["u"]))

    def _on_book(self, m: dict) -> None:
        self.gateway._book_cache(self._decision(m), _usage(m["u"]))

    def _on_fin(self, m: dict) -> None:
        self.gateway._finished(m["p"], m["st"], m["sec"])
        self.gateway.metrics.relay_requests_by[str(self.index),].inc()

    def _on_left(self, m: dict) -> None:
        self.gateway._count_disconnect()

    def _on_hello(self, m: dict) -> None:
        self.relays.said_hello(self, m["pid"])

    def _admitted(self, m: dict) -> bool:
        """The request admitted under its key's limits (held until its "end"), or refused to the relay."""
        try:
            if not self.gateway.admitting:
                raise shutting_down()
            admission = self.gateway.auth.admit(self.gateway.auth.by_digest(m["k"]), m["m"])  # a reload may have removed the key: 401
            admission.__enter__()
        except APIError as exc:
            self._refuse(m, exc)
            return False
        self.admissions[m["a"]] = admission
        return True

    def _refuse(self, m: dict, exc: APIError) -> None:
        self.send({"t": "chosen", "q": m["q"], "e": {"status": exc.status, "message": exc.message, "param": exc.param,
                                                      "code": exc.code, "headers": exc.headers}})

    def _end(self, handle: int) -> None:
        if (admission := self.admissions.pop(handle, None)) is not None:
            admission.__exit__(None, None, None)

    def _decision(self, m: dict) -> Decision:
        worker = self.gateway.worker_named(m["w"]) or Worker(m["w"], "")  # gone since: booked by name
        return Decision(worker, m["r"], m["mb"], m["pb"])

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for task in self._choosing.values():
            task.cancel()
        if self.leases or self.admissions:
            log.warning("gateway.relay_link_lost", relay=self.index, leases=len(self.leases),
                        admissions=len(self.admissions))
        for worker, trial in self.leases.values():
            self.gateway.release_soon(worker, trial)
        self.leases.clear()
        for handle in list(self.admissions):
            self._end(handle)
        self.relays.ends.discard(self)


def _usage(value: list[int] | None) -> Usage | None:
    return None if value is None else Usage(*value)


class Relays:
    def __init__(self, gateway: Gateway, host: str, port: int):
        self.gateway, self.host, self.port = gateway, host, port
        self.count = gateway.config.processes
        self.dir = Path(tempfile.mkdtemp(prefix="sglang-gw-"))  # mode 0700: only this user reaches the sockets
        self.link_path, self.control_path = str(self.dir / "link.sock"), str(self.dir / "control.sock")
        self.lease_ids = itertools.count()
        self.ends: set[RelayEnd] = set()
        self.processes: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.stopping = False
        self._listening = asyncio.Event()  # set once every relay has said hello, at the start
        self._start_failed: asyncio.Future = asyncio.get_running_loop().create_future()  # a relay exited first
        self._keepers: list[asyncio.Task] = []
        # One string hash seed for all the relays, restarted ones too: the prefix-index chains they send are
        # Python hashes (prefix_index.block_chain), which agree only between processes of the same seed.
        self._environment = {**os.environ, "PYTHONHASHSEED": str(secrets.randbelow(2**32 - 1) + 1)}

    def settings(self) -> dict:
        config = self.gateway.config.model_dump(mode="json", include=set(GatewaySettings.model_fields))
        return {"t": "settings", "c": config, "admitting": self.gateway.admitting,
                "block": self.gateway.policy.block_size, "tpl": self.gateway.routing_text.paths}

    def push_settings(self) -> None:
        """After a reload, or a chat template learned: every relay gets the gateway's settings again."""
        message = self.settings()
        for end in self.ends:
            end.send(message)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: self._connected(RelayEnd(self)), self.link_path)
        self._keepers = [loop.create_task(self._keep(i)) for i in range(self.count)]
        listening = asyncio.ensure_future(self._listening.wait())
        await asyncio.wait([listening, self._start_failed], timeout=START_TIMEOUT_S,
                           return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            listening.cancel()
            await self.stop()
            why = self._start_failed.result() if self._start_failed.done() else \
                f"did not all listen within {START_TIMEOUT_S:.0f}s"
            raise CannotListen(f"the relay processes (gateway.processes) on {self.host}:{self.port} {why} "
                               f"(see their log)")
        log.info("gateway.relays_listening", relays=self.count, pids=[p.pid for p in self.processes])

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def _connected(self, end: RelayEnd) -> RelayEnd:
        self.ends.add(end)
        return end

    def said_hello(self, end: RelayEnd, pid: int) -> None:
        end.index = next((i for i, p in enumerate(self.processes) if p is not None and p.pid == pid), None)
        if sum(e.index is not None for e in self.ends) >= self.count:
            self._listening.set()

    async def _keep(self, index: int) -> None:
        """Relay `index`, started again whenever it exits until the gateway stops."""
        level, fmt = configured
        while not self.stopping:
            try:
                process = self.processes[index] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sglang_gw.gateway.relay", self.link_path, self.control_path, self.host,
                    str(self.port), level, fmt, env=self._environment)
            except OSError as exc:  # out of processes or files, say: tried again
                log.error("gateway.relay_not_started", relay=index, error=str(exc))
                await asyncio.sleep(RESTART_DELAY_S)
                continue
            if self.stopping:  # stop began while it was being started: stop() did not see it
                process.terminate()
            code = await process.wait()
            if self.stopping:
                return
            if not self._listening.is_set():  # at the start (the port taken, say): the gateway does not start
                if not self._start_failed.done():
                    self._start_failed.set_result(f"failed: relay {index} exited with code {code} before listening")
                return
            log.warning("gateway.relay_exited", relay=index, pid=process.pid, code=code)
            await asyncio.sleep(RESTART_DELAY_S)

    async def stop(self, timeout: float = RELAY_STOP_S) -> None:
        """The relays stop accepting connections and finish the requests they hold, then exit."""
        self.stopping = True
        for process in self.processes:
            if process is not None and process.returncode is None:
                process.terminate()
        running = [p for p in self.processes if p is not None and p.returncode is None]
        if running:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=timeout)
            for process in running:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        for keeper in self._keepers:
            keeper.cancel()
        self._server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, host: str, port: int) -> AsyncIterator[asyncio.Event]:
    """The gateway serving host:port until the block ends (the event: SIGTERM or SIGINT) — itself, or
    through `gateway.processes` relays while it serves their passed-through paths on a Unix socket."""
    if gateway.config.processes == 1:
        async with listening(gateway.app, host, port) as stop:
            settle_heap()
            yield stop
        return
    relays = gateway.relays = Relays(gateway, host, port)
    try:
        async with listening(gateway.app, host, port, unix_path=relays.control_path) as stop:
            await relays.start()
            settle_heap()
            try:
                yield stop
            finally:
                await relays.stop()
    finally:
        gateway.relays = None
