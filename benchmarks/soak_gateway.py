"""Soak (issue #12; not in CI): many concurrent SSE clients through the gateway for minutes, against
fake engines that stream slowly, with the gateway's resources sampled as it goes.

--clients (1000) clients each stream one completion after another (--tokens events at --token-delay s
apart: 10 s streams by default) for --minutes (10), through `sglang-gw gateway` pinned to one core in
front of 4 fake engines (bench_gateway.py's, on the other core with this load generator). Every
--every (5) s: the gateway's RSS, open file descriptors and CPU seconds, the events relayed so far, and
the event-loop lag as the gateway's own /health round trip (probed twice a second).

Reports RSS and fds at start (after the first minute, when every client is streaming) and at the end
(flat = within 5%), /health round trip p50/p99, and the gateway's CPU per relayed event.

    python benchmarks/soak_gateway.py [--clients 1000] [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench_gateway import MODEL, start_fakes, start_gateway

from sglang_gw.testing import cpu_seconds


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(url: str, pid: int, clients: int, tokens: int, seconds: float, every: float) -> dict:
    counts = {"events": 0, "streams": 0, "errors": 0}
    lags: list[float] = []
    samples: list[dict] = []
    deadline = time.monotonic() + seconds
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": tokens, "stream": True}).encode()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                try:
                    async with session.post(url + "/v1/completions", data=body,
                                            headers={"Content-Type": "application/json"}) as resp:
                        if resp.status != 200:
                            counts["errors"] += 1
                            await asyncio.sleep(1)
                            continue
                        async for line in resp.content:
                            if line.startswith(b"data: "):
                                counts["events"] += 1
                        counts["streams"] += 1
                except aiohttp.ClientError:
                    counts["errors"] += 1

        async def probe_lag() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.get(url + "/health") as resp:
                    await resp.read()
                lags.append(time.perf_counter() - started)
                await asyncio.sleep(0.5)

        async def sample() -> None:
            started = time.monotonic()
            while time.monotonic() < deadline:
                samples.append({"t": time.monotonic() - started, "rss_kib": rss_kib(pid), "fds": open_fds(pid),
                                "cpu_s": cpu_seconds([pid]), **counts})
                print(f"{samples[-1]['t']:6.0f} s  RSS {samples[-1]['rss_kib'] / 1024:7.1f} MiB  "
                      f"fds {samples[-1]['fds']:5d}  events {counts['events']:9d}  errors {counts['errors']}",
                      flush=True)
                await asyncio.sleep(every)

        await asyncio.gather(sample(), probe_lag(), *(client() for _ in range(clients)))
    return {"samples": samples, "lags": lags, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--token-delay", type=float, default=0.1)
    ap.add_argument("--every", type=float, default=5)
    ap.add_argument("--json", help="write the samples here too")
    args = ap.parse_args()

    # Three sockets per client (client, gateway in and out) plus the fakes' ends.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the processes started below
    gateway_core, other_core = 1, 0
    os.sched_setaffinity(0, {other_core})
    fakes, urls = start_fakes(4, args.token_delay, other_core)
    gateway, url, _ = start_gateway(urls, gateway_core, Path(tempfile.mkdtemp()), "least_conn")
    try:
        result = asyncio.run(soak(url, gateway.pid, args.clients, args.tokens, args.minutes * 60, args.every))
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=60)
        for fake in fakes:
            fake.terminate()

    samples = result["samples"]
    start = next((s for s in samples if s["t"] >= 60), samples[len(samples) // 2])
    end = samples[-1]
    lags = sorted(result["lags"])
    cpu_per_event = (end["cpu_s"] - start["cpu_s"]) / max(end["events"] - start["events"], 1)
    print(f"\n{args.clients} SSE clients for {args.minutes:g} min ({args.tokens} events, {args.token_delay} s apart, "
          f"per stream): {result['streams']} streams, {result['events']} events, {result['errors']} errors")
    print(f"gateway RSS {start['rss_kib'] / 1024:.1f} → {end['rss_kib'] / 1024:.1f} MiB "
          f"({end['rss_kib'] / start['rss_kib'] - 1:+.1%}), open fds {start['fds']} → {end['fds']} "
          f"({end['fds'] / start['fds'] - 1:+.1%}) from t={start['t']:.0f} s to the end")
    print(f"/health round trip (event-loop lag) p50 {statistics.median(lags) * 1e3:.1f} ms, "
          f"p99 {lags[int(len(lags) * 0.99)] * 1e3:.1f} ms; gateway CPU per relayed event {cpu_per_event * 1e6:.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
