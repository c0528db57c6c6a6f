"""A fake LLM server for measuring the load generator itself: it answers the three APIs `sglang-gw bench`
speaks (OpenAI chat and completions, SGLang's /generate), streamed or not, with max_tokens tokens of
"tok", the first after --ttft seconds and each next one --itl seconds later (0: no wait at all), and
usage counting a prompt's words as its tokens. No model, no cache (cached_tokens 0).

    python -m sglang_gw.bench.fake_server --port 30000 --ttft 0.2 --itl 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

from aiohttp import web

from sglang_gw.serving import listening
from sglang_gw.testing import free_port, stop_process, wait_http

TOKEN = "tok "


async def _token_times(ttft: float, itl: float, count: int):
    """Yields once per token, when it is due (scheduled from the start: no drift from late wake-ups)."""
    start = time.perf_counter()
    for i in range(count):
        due = ttft + i * itl
        if due > 0:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
        yield i


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}


class FakeServer:
    def __init__(self, ttft: float, itl: float):
        self.ttft, self.itl = ttft, itl

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", lambda _: web.Response(text="ok"))
        app.router.add_get("/v1/models", lambda _: web.json_response({"object": "list", "data": [
            {"id": "fake", "object": "model", "owned_by": "fake"}]}))
        app.router.add_get("/get_model_info", lambda _: web.json_response({"model_path": "fake"}))
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/generate", self.generate)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        words = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        return await self._openai(request, body, words, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._openai(request, body, len(body["prompt"].split()), chat=False)

    async def _openai(self, request: web.Request, body: dict, prompt_tokens: int, chat: bool) -> web.StreamResponse:
        count = body.get("max_tokens") or 16
        head = {"id": "fake", "object": "chat.completion.chunk" if chat else "text_completion", "model": "fake"}
        if not body.get("stream"):
            async for _ in _token_times(self.ttft, self.itl, count):
                pass
            text = TOKEN * count
            choice = {"index": 0, "finish_reason": "length",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return web.json_response(dict(head, choices=[choice], usage=_usage(prompt_tokens, count)))
        resp = await _sse_response(request)
        async for i in _token_times(self.ttft, self.itl, count):
            choice = {"index": 0, "finish_reason": "length" if i == count - 1 else None,
                      **({"delta": {"content": TOKEN}} if chat else {"text": TOKEN})}
            await resp.write(b"data: " + json.dumps(dict(head, choices=[choice])).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = dict(head, choices=[], usage=_usage(prompt_tokens, count))
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        count = body.get("sampling_params", {}).get("max_new_tokens") or 16
        prompt_tokens = len(body["text"].split())

        def event(done: int) -> dict:
            return {"text": TOKEN * done, "meta_info": {
                "id": "fake", "prompt_tokens": prompt_tokens, "completion_tokens": done, "cached_tokens": 0,
                "finish_reason": {"type": "length", "length": count} if done == count else None}}

        if not body.get("stream"):
            async for _ in _token_times(self.ttft, self.itl, count):
                pass
            return web.json_response(event(count))
        resp = await _sse_response(request)
        async for i in _token_times(self.ttft, self.itl, count):
            await resp.write(b"data: " + json.dumps(event(i + 1)).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _sse_response(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def serve(host: str, port: int, ttft: float, itl: float) -> None:
    async with listening(FakeServer(ttft, itl).app(), host, port) as stop:
        print(f"fake server on http://{host}:{port} (ttft {ttft} s, itl {itl} s)", flush=True)
        await stop.wait()


def spawn(ttft: float = 0.0, itl: float = 0.0, core: int | None = None) -> tuple[subprocess.Popen, str]:
    """(process, URL) of a fake server on a free port, answering /health; pinned to `core` when given."""
    port = free_port()
    pin = ["taskset", "-c", str(core)] if core is not None else []
    proc = subprocess.Popen([*pin, sys.executable, "-m", "sglang_gw.bench.fake_server", "--port", str(port),
                             "--ttft", str(ttft), "--itl", str(itl)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, timeout=30)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    ap.add_argument("--itl", type=float, default=0.0, help="seconds between tokens")
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.ttft, args.itl))


if __name__ == "__main__":
    main()
