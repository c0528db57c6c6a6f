"""The floor under the gateway's request path: aiohttp's server and sglang-gw's upstream client
(gateway/upstream.py), forwarding POSTs round robin and relaying the answer (an event stream as its
chunks come), its heap settled as the gateway's processes' are (sglang_gw/serving.py), with nothing else
(no parsing, routing, health, metrics, logs or failover).
`bench_gateway.py --floor` measures it next to the gateway: the least a proxy built on these parts costs.

    python benchmarks/floor_proxy.py PORT ENGINE_URL [ENGINE_URL ...]
"""

from __future__ import annotations

import itertools
import sys

import uvloop
from aiohttp import web

from sglang_gw.gateway.upstream import Upstream
from sglang_gw.serving import listening, settle_heap


async def serve(port: int, urls: list[str]) -> None:
    upstream, engines = Upstream(), itertools.cycle(urls)

    async def forward(request: web.Request) -> web.StreamResponse:
        answer = await upstream.post(next(engines), request.path, await request.read(),
                                     {"Content-Type": "application/json"}, 60.0)
        try:
            content_type = next(v for k, v in answer.headers if k.lower() == "content-type")
            if not content_type.startswith("text/event-stream"):
                return web.Response(status=answer.status, body=await answer.read(),
                                    headers={"Content-Type": content_type})
            stream = web.StreamResponse(status=answer.status, headers={"Content-Type": content_type})
            await stream.prepare(request)
            while chunk := await answer.chunk():
                await stream.write(chunk)
            await stream.write_eof()
            return stream
        finally:
            answer.close()

    app = web.Application()
    app.router.add_post("/v1/completions", forward)
    app.router.add_get("/health", lambda _: web.Response(text="ok"))
    async with listening(app, "127.0.0.1", port) as stop:
        settle_heap()  # as the gateway's processes do
        await stop.wait()
    upstream.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2:]))
