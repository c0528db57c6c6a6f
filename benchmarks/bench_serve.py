"""`sglang-gw serve` operations (issue #5), on the embedded model with config/default.yaml (2 CPU engines).

1. Startup: `serve` from spawn to the first answered chat request and to both engines ready, against
   the baseline of one bare `sglang-gw engine` process from spawn to /health 200 (same run).
2. Engine death: kill -9 one engine (several times); time until the gateway stops routing to it
   (polled on /workers every 2 ms) and until it is re-admitted (ready again, new pid).
3. Rolling restart under 32-way load: non-streamed chat requests from 32 clients with the SDK's own
   retries off; requests lost (goal 0), the restart's duration and the throughput during it vs before.

    python benchmarks/bench_serve.py [--kills 5] [--clients 32]
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
import tempfile
import time
from pathlib import Path

import aiohttp
from tqdm import tqdm

from sglang_gw.testing import free_port, wait_http


REPO = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"
ADMIN_KEY = "sk-bench-admin"


def start_serve(port: int, base_port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sglang_gw", "serve", str(REPO / "config" / "default.yaml"), "--set",
         f"gateway.port={port}", "--set", f"engines.0.base_port={base_port}", "--set", "logging.format=json",
         "--set", "gateway.health.interval=0.5"],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=dict(os.environ, SGLANG_GW_ADMIN_KEY=ADMIN_KEY))


async def chat(session: aiohttp.ClientSession, url: str, text: str) -> int:
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def engines(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/engines") as resp:
        return {e["name"]: e for e in (await resp.json())["engines"]}


async def wait_until(predicate, timeout: float = 300, every: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every)
    raise TimeoutError


async def measure_startup(session, port: int, base_port: int, log: Path) -> tuple[subprocess.Popen, dict]:
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = start_serve(port, base_port, log)

    async def answered():
        try:
            return await chat(session, url, "hello") == 200
        except aiohttp.ClientError:
            return False

    await wait_until(answered, 600, 0.05)
    first = time.monotonic() - t0
    await wait_until(lambda: _all_ready(session, url), 600, 0.05)
    return proc, {"first_answer_s": first, "all_ready_s": time.monotonic() - t0}


async def bare_engine_startup() -> float:
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw", "engine", "--port", str(port), "--num-threads", "1",
                             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health", proc, 600)
        return time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


async def measure_kills(session, url: str, kills: int) -> dict:
    eject, readmit = [], []
    for i in tqdm(range(kills), desc="kill -9"):
        name = f"engine-{i % 2}"
        await wait_until(lambda: _all_ready(session, url), 300, 0.05)
        pid = (await engines(session, url))[name]["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        async def out():
            async with session.get(url + "/workers") as resp:
                return next(w for w in (await resp.json())["workers"] if w["name"] == name)["state"] != "ready"

        await wait_until(out, 10)
        eject.append(time.monotonic() - t0)

        async def back():
            async with session.get(url + "/workers") as resp:
                worker = next(w for w in (await resp.json())["workers"] if w["name"] == name)
            return worker["state"] == "ready" and (await engines(session, url))[name]["pid"] != pid

        await wait_until(back, 300, 0.01)
        readmit.append(time.monotonic() - t0)
    return {"eject_s": eject, "readmit_s": readmit}


async def _all_ready(session, url) -> bool:
    try:
        return all(e["phase"] == "ready" for e in (await engines(session, url)).values())
    except aiohttp.ClientError:
        return False


async def measure_rolling_restart(session, url: str, clients: int) -> dict:
    counts = {"ok": 0, "failed": 0}
    stamps: list[float] = []
    stop = asyncio.Event()

    async def client(i: int):
        n = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as own:
            while not stop.is_set():
                n += 1
                try:
                    status = await chat(own, url, f"client {i} request {n}")
                except aiohttp.ClientError:
                    status = 0
                counts["ok" if status == 200 else "failed"] += 1
                if status == 200:
                    stamps.append(time.monotonic())

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(20)  # steady state before
    t0 = time.monotonic()
    async with session.post(url + "/admin/engines/restart?wait=true",
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                            timeout=aiohttp.ClientTimeout(total=900)) as resp:
        result = await resp.json()
    t1 = time.monotonic()
    await asyncio.sleep(5)
    stop.set()
    await asyncio.gather(*tasks)
    before = sum(1 for s in stamps if t0 - 15 <= s < t0) / 15
    during = sum(1 for s in stamps if t0 <= s < t1) / (t1 - t0)
    return {"restarted": result, "duration_s": t1 - t0, "ok": counts["ok"], "failed": counts["failed"],
            "req_per_s_before": before, "req_per_s_during": during}


async def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port, base = free_port(), 39000 + os.getpid() % 1000 * 2
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            print("baseline: one bare engine process ...", flush=True)
            bare = await bare_engine_startup()
            print("serve config/default.yaml ...", flush=True)
            proc, startup = await measure_startup(session, port, base, Path(tmp) / "serve.log")
            url = f"http://127.0.0.1:{port}"
            try:
                kills = await measure_kills(session, url, args.kills)
                await wait_until(lambda: _all_ready(session, url), 300, 0.05)
                rolling = await measure_rolling_restart(session, url, args.clients)
            finally:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=120)
    print(json.dumps({"bare_engine_start_s": bare, **startup, **kills, **rolling, "serve_exit_code": code}, indent=1))
    print(f"\nstartup: first answer {startup['first_answer_s']:.1f} s, both engines {startup['all_ready_s']:.1f} s "
          f"(one bare engine: {bare:.1f} s, ratio {startup['first_answer_s'] / bare:.2f}x)")
    print(f"kill -9 -> ejected: median {statistics.median(kills['eject_s']) * 1000:.1f} ms, "
          f"max {max(kills['eject_s']) * 1000:.1f} ms; -> re-admitted: median "
          f"{statistics.median(kills['readmit_s']):.2f} s, max {max(kills['readmit_s']):.2f} s "
          f"(n={len(kills['eject_s'])})")
    print(f"rolling restart under {args.clients}-way load: {rolling['failed']} of "
          f"{rolling['ok'] + rolling['failed']} requests lost; took {rolling['duration_s']:.1f} s; throughput "
          f"during/before {rolling['req_per_s_during'] / rolling['req_per_s_before']:.2f} "
          f"({rolling['req_per_s_during']:.1f} vs {rolling['req_per_s_before']:.1f} req/s); exit code {code}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--clients", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
