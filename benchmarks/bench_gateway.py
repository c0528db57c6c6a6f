"""Gateway cost (issues #4, #13): sglang-gw's gateway vs nginx (least_conn, proxy_buffering off) and, given
its interpreter, SGLang's Rust router (`sglang-router` from PyPI, cache_aware), same run.

Four fake engines (sglang_gw/bench/fake_server.py) answer at once; each proxy runs pinned to one core
(taskset), the fakes and the load generator on the other. Per proxy: non-streamed requests per second (as
far as the load generator, on the other core, can send them; and what the proxy's CPU per request would
allow on its core), CPU seconds per non-streamed request, CPU seconds per relayed SSE event (64-event streams), p50/p99 latency added over going to an
engine directly, and time to first SSE event when the engines take 20 ms per token (a few streams at once:
the delay the proxy adds, not its queueing under load).

    apt-get install nginx-light   # once
    python -m venv /tmp/rv && /tmp/rv/bin/pip install sglang-router setproctitle uvicorn fastapi orjson  # once
    python benchmarks/bench_gateway.py [--requests 2000] [--concurrency 64] [--policy prefix_affinity]
                                       [--prompt-bytes 2] [--router-python /tmp/rv/bin/python] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import aiohttp
import yaml

from sglang_gw.bench import fake_server
from sglang_gw.testing import cpu_seconds, free_port, wait_http


MODEL = "fake"  # the fake server's one model


# ---- processes ---------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def start_fakes(n: int, token_delay: float, core: int) -> tuple[list[subprocess.Popen], list[str]]:
    # sglang-gw bench's fake server: each token (the first included) token_delay after the last.
    spawned = [fake_server.spawn(token_delay, token_delay, core) for _ in range(n)]
    return [proc for proc, _ in spawned], [url for _, url in spawned]


def start_gateway(urls: list[str], core: int, workdir: Path, policy: str,
                  processes: int = 1) -> tuple[subprocess.Popen, str, list[int]]:
    port = free_port()
    config = {"port": port, "workers": [{"url": u} for u in urls], "policy": {"name": policy},
              "health": {"interval": 5.0}, "processes": processes}
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-m", "sglang_gw.cli", "gateway",
                             "--config", str(path), "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready")
    return proc, url, [proc.pid, *children(proc.pid)]  # the gateway process first, then its relays


def start_router(urls: list[str], core: int, workdir: Path, python: str) -> tuple[subprocess.Popen, str, list[int]]:
    """SGLang's router (Rust, from the sglang-router wheel), cache_aware, as its users run it."""
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", str(core), python, "-m", "sglang_router.launch_router", "--worker-urls",
                             *urls, "--policy", "cache_aware", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "router.log", "w"))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return proc, url, [proc.pid, *children(proc.pid)]


def start_floor(urls: list[str], core: int, workdir: Path, server: str) -> tuple[subprocess.Popen, str, list[int]]:
    """benchmarks/floor_proxy.py: a server (aiohttp's app or low-level one, or none) and our upstream client
    forwarding, nothing else."""
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", str(core), sys.executable, str(Path(__file__).with_name("floor_proxy.py")),
                             "--server", server, str(port), *urls], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return proc, url, [proc.pid]


def start_nginx(urls: list[str], core: int, workdir: Path) -> tuple[subprocess.Popen, str, list[int]]:
    port = free_port()
    upstreams = "\n".join(f"    server {u.removeprefix('http://')};" for u in urls)
    (workdir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream engines {{
    least_conn;
{upstreams}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://engines;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      client_body_buffer_size 64k;
    }}
  }}
}}
""")
    proc = subprocess.Popen(["taskset", "-c", str(core), "nginx", "-c", str(workdir / "nginx.conf"),
                             "-p", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return proc, url, [proc.pid, *children(proc.pid)]


# ---- load ---------------------------------------------------------------------------------------------

def prompts(size: int) -> list[str]:
    """The prompts requests cycle through: "hi", or 16 tenants' prompts of `size` bytes (each request's
    prefix then matters to a cache-aware proxy, as a chat's system prompt does)."""
    if size <= 2:
        return ["hi"]
    return [(f"tenant {t}: " + "the quick brown fox jumps over the lazy dog " * (size // 44 + 1))[:size]
            for t in range(16)]


async def load(targets: str | list[str], requests: int, concurrency: int, stream: bool,
               tokens: int = 64, prompt_bytes: int = 2) -> list[tuple[float, float]]:
    """(latency, time to first byte of body) per request; several targets are used in turn."""
    targets = [targets] if isinstance(targets, str) else targets
    bodies = [json.dumps({"model": MODEL, "prompt": p, "max_tokens": tokens, "stream": stream}).encode()
              for p in prompts(prompt_bytes)]
    results = []
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int):
            url = targets[i % len(targets)]
            async with limit:
                start = time.perf_counter()
                first = None
                async with session.post(url + "/v1/completions", data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 200, resp.status
                    async for _ in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - start
                results.append((time.perf_counter() - start, first))

        await asyncio.gather(*(one(i) for i in range(requests)))
    return results


def pct(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--stream-requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--first-event-concurrency", type=int, default=4,
                    help="streams at once while timing the first event (few: the proxy's delay, not the load's)")
    ap.add_argument("--policy", default="least_conn", help="sglang-gw's routing policy")
    ap.add_argument("--prompt-bytes", type=int, default=2,
                    help="prompt size: 2 is \"hi\"; more is 16 tenants' prompts of that size, in turn")
    ap.add_argument("--floor", action="store_true",
                    help="adds benchmarks/floor_proxy.py, our upstream client forwarding and nothing else, behind "
                         "aiohttp's web app (floor), its low-level server (floor-lowlevel), and no aiohttp (floor-raw)")
    ap.add_argument("--router-python", help="an interpreter with sglang-router installed: adds SGLang's router")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every proxy this many times, in turn, and print each figure's median")
    ap.add_argument("--processes", type=int, default=1,
                    help="more than 1 adds sglang-gw with that many relay processes (gateway.processes), on the "
                         "same one core: its CPU per request, and the gateway process's share of it")
    args = ap.parse_args()
    traffic = partial(load, prompt_bytes=args.prompt_bytes)
    if shutil.which("nginx") is None:
        sys.exit("nginx is not installed: apt-get install nginx-light")

    proxy_core, other_core = 1, 0
    os.sched_setaffinity(0, {other_core})  # the load generator (and the fakes it starts) stay off the proxy's core
    workdir = Path(tempfile.mkdtemp())
    proxies = [("sglang-gw", lambda *a: start_gateway(*a, args.policy)), ("nginx", start_nginx)]
    if args.router_python:
        proxies.append(("sgl-router", lambda *a: start_router(*a, args.router_python)))
    if args.floor:
        proxies += [(name, lambda *a, server=server: start_floor(*a, server))
                    for name, server in (("floor", "app"), ("floor-lowlevel", "lowlevel"), ("floor-raw", "raw"))]
    if args.processes > 1:
        proxies.append((f"gw-x{args.processes}", lambda *a: start_gateway(*a, args.policy, args.processes)))

    @contextlib.contextmanager
    def running(start, urls):
        proc, url, pids = start(urls, proxy_core, workdir)
        try:
            yield url, pids
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    @contextlib.contextmanager
    def fakes(token_delay: float):
        procs, urls = start_fakes(4, token_delay, other_core)
        try:
            yield urls
        finally:
            for p in procs:
                p.terminate()

    rounds: dict[str, list[dict]] = {name: [] for name, _ in proxies}
    with fakes(0.0) as urls:
        direct = asyncio.run(traffic(urls, args.requests, args.concurrency, False))  # client-side round robin
        for _ in range(args.rounds):  # the proxies in turn each round, so that the machine's drift hits them alike
            for name, start in proxies:
                with running(start, urls) as (url, pids):
                    asyncio.run(traffic(url, 200, args.concurrency, False))  # warm-up: connections, caches
                    cpu0, main0, started = cpu_seconds(pids), cpu_seconds(pids[:1]), time.perf_counter()
                    plain = asyncio.run(traffic(url, args.requests, args.concurrency, False))
                    cpu1, main1, elapsed = cpu_seconds(pids), cpu_seconds(pids[:1]), time.perf_counter() - started
                    asyncio.run(traffic(url, args.stream_requests, args.concurrency, True))
                    cpu2 = cpu_seconds(pids)
                rounds[name].append({"cpu_per_request_us": (cpu1 - cpu0) / args.requests * 1e6,
                                     "main_cpu_per_request_us": (main1 - main0) / args.requests * 1e6,
                                     "cpu_per_event_us": (cpu2 - cpu1) / (args.stream_requests * 65) * 1e6,
                                     "latency": pct([lat for lat, _ in plain]), "rps": args.requests / elapsed})
    # Each figure's median over the rounds (a latency pair, p50 and p99, sorts by its p50).
    rows = {name: {key: statistics.median_low([r[key] for r in runs]) for key in runs[0]}
            for name, runs in rounds.items()}
    with fakes(0.02) as urls:
        ttfe_load = partial(traffic, requests=256, concurrency=args.first_event_concurrency, stream=True, tokens=16)
        direct_ttfe = asyncio.run(ttfe_load(urls))
        for name, start in proxies:
            with running(start, urls) as (url, _):
                rows[name]["ttfe"] = pct([first for _, first in asyncio.run(ttfe_load(url))])

    d50, d99 = pct([lat for lat, _ in direct])
    t50, t99 = pct([first for _, first in direct_ttfe])
    print(f"\n{args.requests} non-streamed + {args.stream_requests} streamed (64 events) requests, "
          f"{args.concurrency} concurrent clients, 4 zero-delay fake engines, proxy pinned to one core; "
          f"sglang-gw policy {args.policy}; prompts of {len(prompts(args.prompt_bytes)[0])} bytes"
          + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else ""))
    print(f"direct to the engines: latency p50 {d50:.2f} ms p99 {d99:.2f} ms; "
          f"time to first event (20 ms/token, {args.first_event_concurrency} streams at once) p50 {t50:.1f} ms "
          f"p99 {t99:.1f} ms")
    for name, r in rows.items():
        l50, l99 = r["latency"]
        f50, f99 = r["ttfe"]
        print(f"{name:10s} {r['rps']:.0f} req/s (its CPU per request allows {1e6 / r['cpu_per_request_us']:.0f} on "
              f"one core), CPU {r['cpu_per_request_us']:.0f} us/request, {r['cpu_per_event_us']:.1f} us/SSE event; "
              f"latency p50 {l50:.2f} ms p99 {l99:.2f} ms (added vs direct: {l50 - d50:+.2f} / {l99 - d99:+.2f}); "
              f"first event p50 {f50:.1f} ms ({f50 - t50:+.1f}) p99 {f99:.1f} ms ({f99 - t99:+.1f})")
    if args.processes > 1:
        multi = rows[f"gw-x{args.processes}"]
        print(f"gw-x{args.processes}: the gateway process (all routing state) {multi['main_cpu_per_request_us']:.0f} us "
              f"of its {multi['cpu_per_request_us']:.0f} us/request, the relays the rest: with a core per process, "
              f"up to {rows['sglang-gw']['cpu_per_request_us'] / multi['main_cpu_per_request_us']:.1f}x one "
              f"process's requests per second before the gateway process saturates")
    g = rows["sglang-gw"]
    for peer in [name for name in rows if name != "sglang-gw"]:
        p = rows[peer]
        print(f"ratio sglang-gw / {peer}: CPU per request {g['cpu_per_request_us'] / p['cpu_per_request_us']:.2f}x, "
              f"CPU per SSE event {g['cpu_per_event_us'] / p['cpu_per_event_us']:.2f}x")


if __name__ == "__main__":
    main()
