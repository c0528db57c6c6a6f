"""HTTP overhead benchmark (issue #3): the engine-core workload through `sglang-gw engine` with one
concurrent streaming client per request, vs the same workload through the offline API, in one run.

Reports throughput of each, their ratio (server / offline), and p50/p99 time to first token (for the
server: measured by the client, to the first SSE event that carries a token).

    python benchmarks/bench_server.py [--model builtin:smollm2-135m-instruct] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import aiohttp
from tqdm import tqdm

from sglang_gw.engine import Engine, SamplingParams
from sglang_gw.testing import free_port, sse_event, wait_http


def make_workload(n: int, vocab: int, seed: int, in_range=(32, 512), out_range=(16, 256)):
    """Token-id prompts and output lengths (the same ids through the offline API and over HTTP)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    return prompts, [rng.randint(*out_range) for _ in range(n)]


def percentiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98]


async def run_offline(engine: Engine, prompts, out_lens) -> tuple[float, list[float]]:
    bar = tqdm(total=len(prompts), desc="offline API", unit="req", file=sys.stderr)

    async def one(prompt, n):
        start = time.perf_counter()
        ttft = None
        async for out in engine.generate_stream(prompt, SamplingParams(max_new_tokens=n, temperature=0,
                                                                          ignore_eos=True)):
            if ttft is None and out.output_ids:
                ttft = time.perf_counter() - start
            if out.finished:
                assert len(out.output_ids) == n
        bar.update(1)
        return ttft

    return await timed(bar, [one(p, n) for p, n in zip(prompts, out_lens)])


async def timed(bar: tqdm, requests: list) -> tuple[float, list[float]]:
    """Run all requests at once: (wall seconds, each one's time to first token)."""
    start = time.perf_counter()
    ttfts = await asyncio.gather(*requests)
    bar.close()
    return time.perf_counter() - start, ttfts


async def run_http(url: str, prompts, out_lens) -> tuple[float, list[float]]:
    bar = tqdm(total=len(prompts), desc="HTTP /generate", unit="req", file=sys.stderr)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def one(prompt, n):
            body = {"input_ids": prompt, "stream": True,
                    "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
            start = time.perf_counter()
            ttft, last = None, None
            async with session.post(url + "/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                async for line in resp.content:
                    event = sse_event(line)
                    if not isinstance(event, dict):
                        continue
                    last = event
                    if ttft is None and last["output_ids"]:
                        ttft = time.perf_counter() - start
            assert last["meta_info"]["completion_tokens"] == n
            bar.update(1)
            return ttft

        return await timed(bar, [one(p, n) for p, n in zip(prompts, out_lens)])


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_gw.cli", "engine", "--model", args.model, "--port", str(port),
           "--num-threads", str(args.threads), "--kv-cache-gib", str(args.kv_cache_gib),
           "--max-running-requests", str(args.requests), "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--kv-cache-gib", type=float, default=3.0)
    args = ap.parse_args()

    engine = Engine(model=args.model, num_threads=args.threads, kv_cache_gib=args.kv_cache_gib,
                    max_running_requests=args.requests)
    prompts, out_lens = make_workload(args.requests, engine.model.config.vocab_size, seed=0)
    engine.generate(prompts[0][:64], SamplingParams(max_new_tokens=4))  # warm-up, as the server does
    engine.run_when_idle(engine.cache.reset)
    offline_s, offline_ttft = asyncio.run(run_offline(engine, prompts, out_lens))
    engine.shutdown()
    del engine

    proc, url = start_server(args)
    try:
        http_s, http_ttft = asyncio.run(run_http(url, prompts, out_lens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    tokens = sum(out_lens)
    print(f"\nworkload: {args.requests} requests (prompts {sum(map(len, prompts))} tokens, outputs {tokens} tokens), "
          f"{args.model}, {args.threads} threads, one concurrent client per request")
    print(f"offline API : {offline_s:.1f} s, {tokens / offline_s:.1f} output tok/s, "
          "TTFT p50 {:.0f} ms, p99 {:.0f} ms".format(*(x * 1000 for x in percentiles(offline_ttft))))
    print(f"HTTP server : {http_s:.1f} s, {tokens / http_s:.1f} output tok/s, "
          "TTFT p50 {:.0f} ms, p99 {:.0f} ms".format(*(x * 1000 for x in percentiles(http_ttft))))
    print(f"throughput ratio (server / offline): {offline_s / http_s:.3f}")


if __name__ == "__main__":
    main()
