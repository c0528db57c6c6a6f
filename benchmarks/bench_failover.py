"""Mid-stream failover (issue 12): what a stream whose engine dies costs its client.

`sglang-gw serve config/default.yaml` (2 CPU engines, the embedded model). First a reference run of N
greedy chat streams with no kill; then the same streams again, and once every stream has K events,
`kill -9` of the engine serving the most of them. For each stream that was on it: the gap it saw (the
longest wait between two events, which is the failover's), next to the usual wait between events in
the same run, and whether its text equals the reference run's. The peer is what every other server
does (the stream ends with an error): the client retries, and waits for a new first token plus all
the tokens it had again, estimated from this run's own pace.

    python benchmarks/bench_failover.py [--streams 16] [--max-tokens 160] [--kill-after 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from tqdm import tqdm

from sglang_gw.testing import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"


class Stream:
    def __init__(self, i: int):
        self.prompt = f"Story {i}: tell me about the {['sea', 'city', 'forest', 'desert'][i % 4]} number {i}."
        self.arrivals: list[float] = []
        self.text = ""
        self.worker = ""
        self.sent_at = 0.0
        self.first_token = 0.0


async def run_stream(session: aiohttp.ClientSession, url: str, s: Stream, max_tokens: int) -> Stream:
    body = {"model": MODEL, "messages": [{"role": "user", "content": s.prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    s.sent_at = time.monotonic()
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        s.worker = resp.headers.get("x-sglang-gw-worker", "")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            s.arrivals.append(time.monotonic())
            event = json.loads(line[6:])
            assert "error" not in event, event
            s.text += event["choices"][0]["delta"].get("content") or ""
    s.first_token = s.arrivals[0] - s.sent_at
    return s


async def main(args) -> None:
    port, base_port = free_port(), free_port()
    log = Path(args.log)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_gw", "serve", str(REPO / "config" / "default.yaml"), "--set",
         f"gateway.port={port}", "--set", f"engines.0.base_port={base_port}", "--set", "logging.format=json"],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await asyncio.to_thread(wait_http, url + "/health", proc, 600)
            while True:
                async with session.get(url + "/engines") as resp:
                    engines = {e["name"]: e for e in (await resp.json())["engines"]}
                if all(e["phase"] == "ready" for e in engines.values()):
                    break
                await asyncio.sleep(0.2)
            print(f"serve ready: {len(engines)} engines; reference run ({args.streams} streams) …", flush=True)
            reference = await asyncio.gather(*(run_stream(session, url, Stream(i), args.max_tokens)
                                               for i in range(args.streams)))
            await session.post(url + "/flush_cache")  # the kill run starts cold, as the reference did

            streams = [Stream(i) for i in range(args.streams)]
            tasks = [asyncio.create_task(run_stream(session, url, s, args.max_tokens)) for s in streams]
            with tqdm(total=args.streams, desc=f"streams with {args.kill_after} events") as bar:
                while (ready := sum(len(s.arrivals) >= args.kill_after for s in streams)) < args.streams:
                    bar.n = ready
                    bar.refresh()
                    await asyncio.sleep(0.01)
            on = {name: sum(s.worker == name for s in streams) for name in engines}
            victim = max(on, key=on.get)
            killed = time.monotonic()
            os.kill(engines[victim]["pid"], signal.SIGKILL)
            await asyncio.gather(*tasks)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    resumed = [s for s in streams if s.worker == victim]
    intervals = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:])]
    pace = statistics.median(intervals)
    gaps = sorted(max(b - a for a, b in zip(s.arrivals, s.arrivals[1:])) for s in resumed)
    had = [sum(t <= killed for t in s.arrivals) for s in resumed]
    ttft = statistics.median(s.first_token for s in reference)
    retry = sorted(ttft + n * pace for n in had)  # the peer's client: start over
    same = sum(s.text == r.text for s, r in zip(streams, reference))
    print(f"\nkilled {victim} with {len(resumed)} of {args.streams} streams on it "
          f"(they had {min(had)}–{max(had)} events)")
    print(f"usual wait between events: median {pace * 1000:.1f} ms (all streams, this run)")
    print(f"failover gap:   p50 {statistics.median(gaps) * 1000:.0f} ms   max {gaps[-1] * 1000:.0f} ms "
          f"(extra over the usual wait: p50 {(statistics.median(gaps) - pace) * 1000:.0f} ms)")
    print(f"peer (stream ends with an error; the client starts over): back to the same point after "
          f"p50 {statistics.median(retry) * 1000:.0f} ms, max {retry[-1] * 1000:.0f} ms "
          f"(TTFT {ttft * 1000:.0f} ms + the tokens again)")
    print(f"texts equal to the run without the kill: {same}/{args.streams}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--kill-after", type=int, default=24, help="events every stream has at the kill")
    parser.add_argument("--log", default="/tmp/bench_failover.log")
    asyncio.run(main(parser.parse_args()))
