"""The floor under the gateway's request path: a server and sglang-gw's upstream client (gateway/upstream.py),
forwarding POSTs round robin and relaying the answer (an event stream as its chunks come), its heap settled
as the gateway's processes' are (sglang_gw/serving.py), with nothing else (no parsing, routing, health,
metrics, logs or failover). `bench_gateway.py --floor` measures it next to the gateway: the least a proxy
built on these parts costs. The server is one of:

- app: aiohttp's web.Application, what the gateway runs;
- lowlevel: aiohttp's low-level server (web.Server: no router, no middleware), the cheapest aiohttp offers;
- raw: no aiohttp: an asyncio protocol parsing requests with httptools (llhttp, as aiohttp's own C parser)
  and writing each answer as one buffer. Benchmark-only: no limits, no Expect, no pipelining, no HEAD. It
  says what aiohttp's server itself costs a request.

    python benchmarks/floor_proxy.py [--server app|lowlevel|raw] PORT ENGINE_URL [ENGINE_URL ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import httptools
import uvloop
from aiohttp import web

from sglang_gw.gateway.upstream import Answer, Upstream
from sglang_gw.serving import listening, settle_heap


def content_type(answer: Answer) -> str:
    return next(v for k, v in answer.headers if k.lower() == "content-type")


async def serve_aiohttp(port: int, forward, low_level: bool) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok")
        answer = await forward(request.path, await request.read())
        try:
            kind = content_type(answer)
            if not kind.startswith("text/event-stream"):
                return web.Response(status=answer.status, body=await answer.read(), headers={"Content-Type": kind})
            stream = web.StreamResponse(status=answer.status, headers={"Content-Type": kind})
            await stream.prepare(request)
            while chunk := await answer.chunk():
                await stream.write(chunk)
            await stream.write_eof()
            return stream
        finally:
            answer.close()

    if not low_level:
        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        app.router.add_get("/health", handle)
        async with listening(app, "127.0.0.1", port) as stop:
            settle_heap()  # as the gateway's processes do
            await stop.wait()
        return
    runner = web.ServerRunner(web.Server(handle, handler_cancellation=True, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settle_heap()
    await asyncio.Event().wait()  # until SIGTERM ends the process


class RawConnection(asyncio.Protocol):
    """One client connection: llhttp's callbacks collect a request, a task per request forwards it."""

    def __init__(self, forward):
        self.forward = forward
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.path, self.body = b"", []

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.path, self.body = url, []

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self.handle(self.path.decode(), b"".join(self.body)))

    async def handle(self, path: str, body: bytes) -> None:
        if path == "/health":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
            return
        answer = await self.forward(path, body)
        try:
            kind = content_type(answer)
            head = b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\n" % (answer.status, kind.encode())
            if not kind.startswith("text/event-stream"):
                data = await answer.read()
                self.transport.write(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
                return
            self.transport.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            while chunk := await answer.chunk():
                self.transport.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            self.transport.write(b"0\r\n\r\n")
        finally:
            answer.close()


async def serve_raw(port: int, forward) -> None:
    await asyncio.get_running_loop().create_server(lambda: RawConnection(forward), "127.0.0.1", port)
    settle_heap()
    await asyncio.Event().wait()


async def serve(server: str, port: int, urls: list[str]) -> None:
    upstream, engines = Upstream(), itertools.cycle(urls)

    def forward(path: str, body: bytes):
        return upstream.post(next(engines), path, body, {"Content-Type": "application/json"}, 60.0)

    try:
        if server == "raw":
            await serve_raw(port, forward)
        else:
            await serve_aiohttp(port, forward, low_level=server == "lowlevel")
    finally:
        upstream.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("app", "lowlevel", "raw"), default="app")
    ap.add_argument("port", type=int)
    ap.add_argument("urls", nargs="+")
    args = ap.parse_args()
    uvloop.run(serve(args.server, args.port, args.urls))
