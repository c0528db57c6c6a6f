"""A relay process (`gateway.processes` > 1): one of the processes serving the gateway's port.

Each relay listens on the port with SO_REUSEPORT (the kernel spreads connections over them) and runs
the proxied paths' request path itself (request_path.py: parsing, the routing text, forwarding,
relaying, failover), so those costs scale with the processes. What routing decides stays in the one
gateway process, so that every relay routes on the same prefix index, sessions, leases, key limits
and health: each attempt asks it for a worker and tells it how the attempt went (relay_link.py). Every
other path (control, admin, metrics, status) is passed through to the gateway process whole.

A relay lives as long as its link: when the gateway process goes, so do its relays.

    python -m sglang_gw.gateway.relay LINK_SOCKET CONTROL_SOCKET HOST PORT LOG_LEVEL LOG_FORMAT
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time

import aiohttp
import structlog
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from ..errors import APIError, error_middleware
from ..logs import configure_logging
from ..serving import CannotListen, listening, settle_heap

from .auth import Authenticator, KeyState
from .cache_prediction import Usage
from .config import GatewaySettings
from .policies import Decision, RouteRequest, Worker
from .prefix_index import block_chain
from .relay_link import Link
from .request_path import NOT_RELAYED, PROXIED, RequestPath
from .status import Attempt
from .routing_text import RoutingText
from .sessions import Sessions
from .upstream import Upstream

log = structlog.get_logger(__name__)

# Passed over on pass-through, both ways: hop-by-hop headers and the framing aiohttp redoes (the body arrives
# decoded). Unlike a proxied answer's, the client's x-request-id goes through.
PASSED_OVER = (NOT_RELAYED | {"host"}) - {"x-request-id"}
PROGRESS_EVERY_S = 1.0  # a lease's progress events at most this often (the stall watchdog counts tens of seconds)


class LeaseHealth:
    """A leased worker's health events, told to the gateway process (health.WorkerHealth's request-path
    methods)."""

    __slots__ = ("link", "lease", "last_progress")

    def __init__(self, link: GatewayLink, lease: int):
        self.link, self.lease = link, lease
        self.last_progress = time.monotonic()  # the lease's start counts as progress there too

    def _event(self, event: str, value: object = None) -> None:
        self.link.send({"t": "ev", "l": self.lease, "e": event, "v": value})

    def connect_error(self, why: str) -> None:
        self._event("connect_error", why)

    def stream_failed(self, why: str) -> None:
        self._event("stream_failed", why)

    def response(self, status: int) -> None:
        self._event("response", status)

    def progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = now
            self._event("progress")


class LeasedWorker(Worker):
    """The worker the gateway process chose for one attempt, under its lease."""

    def __init__(self, name: str, url: str, health: LeaseHealth):
        super().__init__(name, url)
        self.health = health


class Admission:
    """A request's admission (the key's limits), held by the gateway process from its first choice until
    the block ends."""

    __slots__ = ("link", "handle", "key", "held")

    def __init__(self, link: GatewayLink, handle: int, key: KeyState | None):
        self.link, self.handle, self.key, self.held = link, handle, key, False

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.link.send({"t": "end", "a": self.handle})


class GatewayLink(Link):
    """The relay's end of the link: asks for choices, and takes the settings the gateway process sends."""

    def __init__(self, relay: Relay):
        super().__init__()
        self.relay = relay
        self._asked: dict[int, asyncio.Future] = {}
        self._questions = itertools.count()

    async def ask(self, message: dict) -> dict:
        """The gateway process's answer. A request that goes away while asking (its client left) takes its
        question back: a choice still waiting for capacity is cancelled there, and a lease that came back
        meanwhile is released."""
        if self.closed.done():
            raise gateway_unavailable()
        q = message["q"] = next(self._questions)
        answer = self._asked[q] = asyncio.get_running_loop().create_future()
        self.send(message)
        try:
            return await answer
        except asyncio.CancelledError:
            if answer.cancelled():  # (with its task) still unanswered
                self.send({"t": "cancel", "q": q})
            elif answer.exception() is None and "lease" in answer.result():  # answered, but not taken
                self.send({"t": "release", "l": answer.result()["lease"]})
            raise
        finally:
            self._asked.pop(q, None)

    def received(self, message: dict) -> None:
        if message["t"] == "settings":
            self.relay.apply(message)
        elif (answer := self._asked.get(message["q"])) is not None and not answer.done():
            answer.set_result(message)
        elif "lease" in message:  # its request was gone (the client left) before the choice came back
            self.send({"t": "release", "l": message["lease"]})

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for answer in self._asked.values():
            if not answer.done():
                answer.set_exception(gateway_unavailable())


class Relay(RequestPath):
    def __init__(self, control_socket: str):
        super().__init__()
        self.link: GatewayLink | None = None  # set once connected
        self.upstream = Upstream()
        self.routing_text = RoutingText()
        self.config: GatewaySettings | None = None  # from the gateway process's first message
        self.auth = Authenticator([])
        self.sessions: Sessions | None = None
        self.block_size: int | None = None  # the policy's prefix-index block size: the routing text is sent as its chain
        self._handles = itertools.count()
        self._control_socket = control_socket
        self.control: aiohttp.ClientSession | None = None
        self.configured = asyncio.Event()
        self._templates: dict[str, str] = {}  # model → the chat template path asked for (routing_text.paths once loaded)
        self._loading: set[asyncio.Task] = set()  # templates loading in threads (held: the loop keeps weak references)

    def apply(self, message: dict) -> None:
        """The gateway process's settings (at the start, and after a reload or a template learned)."""
        self.config = GatewaySettings.model_validate(message["c"])
        self.auth.update(self.config.auth.keys)
        if self.sessions is None:
            self.sessions = Sessions(self.config.session)
        self.sessions.settings = self.config.session
        self.block_size = message["block"]
        self.admitting = message["admitting"]
        # Once per model, at the start or when a worker brings a new model; in a thread, as the gateway process
        # loads its own (until loaded, the model's chats are routed on role-tagged text there too).
        for model, path in message["tpl"].items():
            if self._templates.get(model) != path:
                self._templates[model] = path
                loading = asyncio.get_running_loop().create_task(
                    asyncio.to_thread(self.routing_text.add_template, model, path))
                self._loading.add(loading)
                loading.add_done_callback(self._loading.discard)
        self.configured.set()

    async def templates_loaded(self) -> None:
        await asyncio.gather(*self._loading)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_request_bytes,
                              middlewares=[error_middleware(self.config.max_request_bytes)])
        for path in PROXIED:
            app.router.add_post(path, self.proxy)
        app.router.add_route("*", "/{tail:.*}", self.pass_through)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        # No timeout of its own: the gateway process bounds its control calls (a fan-out to every worker).
        self.control = aiohttp.ClientSession(connector=aiohttp.UnixConnector(self._control_socket),
                                             cookie_jar=aiohttp.DummyCookieJar(),
                                             timeout=aiohttp.ClientTimeout(total=None))

    async def _stop(self, app) -> None:
        self.upstream.close()
        await self.control.close()

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        """Any other path, answered by the gateway process (the paths and methods it serves, its errors)."""
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in PASSED_OVER)
        try:
            async with self.control.request(request.method, "http://gateway" + request.path_qs, headers=headers,
                                            data=await request.read()) as answer:
                body = await answer.read()
                relayed = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in PASSED_OVER)
                return web.Response(status=answer.status, body=body, headers=relayed)
        except aiohttp.ClientError:
            raise gateway_unavailable() from None

    # ---- the request path's hooks (request_path.py), asked of the gateway process ----------------------

    @property
    def _uses_text(self) -> bool:
        return self.block_size is not None

    def _admit(self, key: KeyState | None, model: str | None) -> Admission:
        return Admission(self.link, next(self._handles), key)

    async def _choose(self, model: str | None, admission: Admission, tried: set[str],
                      route: RouteRequest) -> Decision | None:
        admission.held = True  # from the first choice on (the gateway process ends it itself when it refuses)
        text = route.text.encode()
        answer = await self.link.ask({
            "t": "choose", "a": admission.handle, "k": admission.key.digest if admission.key else None, "m": model,
            "s": route.session.hex() if route.session else None, "b": route.batch, "tried": sorted(tried),
            # Hashed here, where the relays share the work, and smaller than the text it stands for.
            "bl": None if self.block_size is None else
            [self.block_size, block_chain(text, self.block_size), len(text)]})
        if "e" in answer:
            e = answer["e"]
            raise APIError(e["status"], e["message"], param=e["param"], code=e["code"], headers=e["headers"])
        if "lease" not in answer:
            return None
        worker = LeasedWorker(answer["w"], answer["u"], LeaseHealth(self.link, answer["lease"]))
        return Decision(worker, answer["r"], answer["mb"], answer["pb"])

    def _lease(self, worker: LeasedWorker) -> int:
        return worker.health.lease  # taken by the gateway process with the choice

    async def _release(self, worker: LeasedWorker, lease: int) -> None:
        self.link.send({"t": "release", "l": lease})

    def _book(self, attempt: Attempt, decision: Decision, usage: Usage | None) -> None:
        self.link.send({"t": "rec", "at": attempt.at, "p": attempt.path, "w": attempt.worker, "route": attempt.route,
                        "r": decision.reason, "mb": attempt.matched_bytes, "pb": decision.prompt_bytes,
                        "st": attempt.status, "ttfb": attempt.ttfb_s, "why": attempt.why, "u": _usage(usage)})

    def _book_cache(self, decision: Decision, usage: Usage) -> None:
        self.link.send({"t": "book", "w": decision.worker.name, "r": decision.reason, "mb": decision.matched_bytes,
                        "pb": decision.prompt_bytes, "u": _usage(usage)})

    def _finished(self, path: str, status: int, seconds: float) -> None:
        self.link.send({"t": "fin", "p": path, "st": status, "sec": seconds})

    def _count_disconnect(self) -> None:
        self.link.send({"t": "left"})


def gateway_unavailable() -> APIError:
    return APIError(503, "the gateway process is not reachable", code="gateway_unavailable",
                    headers={"Retry-After": "1"})


def _usage(usage: Usage | None) -> list[int] | None:
    return None if usage is None else [usage.prompt_tokens, usage.cached_tokens]


async def run_relay(link_socket: str, control_socket: str, host: str, port: int) -> int:
    relay = Relay(control_socket)
    _, link = await asyncio.get_running_loop().create_unix_connection(lambda: GatewayLink(relay), link_socket)
    relay.link = link
    await asyncio.wait([asyncio.ensure_future(relay.configured.wait()), link.closed],
                       return_when=asyncio.FIRST_COMPLETED)
    if link.closed.done():
        return 1
    await relay.templates_loaded()  # those known at the start, before the first request
    async with listening(relay.app(), host, port, reuse_port=True) as stop:
        settle_heap()
        link.send({"t": "hello", "pid": os.getpid()})
        log.info("gateway.relay_listening", host=host, port=port, pid=os.getpid())
        await asyncio.wait([asyncio.ensure_future(stop.wait()), link.closed], return_when=asyncio.FIRST_COMPLETED)
    return 0


def main() -> int:
    link_socket, control_socket, host, port, level, fmt = sys.argv[1:7]
    configure_logging(level, fmt)
    try:
        return uvloop.run(run_relay(link_socket, control_socket, host, int(port)))
    except CannotListen as exc:  # the gateway process stops its start, naming gateway.processes
        log.error("gateway.relay_cannot_listen", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
