"""Routing quality (issue #4): a multi-turn, multi-tenant chat trace through the gateway over N engines,
once per policy, against the same engines (caches flushed in between).

The trace and its measurement are `sglang-gw bench`'s (sglang_gw/bench): the multi-turn workload with
--tenants conversations, each behind its own ~120-word system prompt, --turns turns of 12-word messages
and 8-token answers (temperature 0), all conversations at once with at most --concurrency requests in
flight. Reports, per policy: the prefix-cache hit rate the engines report (cached / prompt tokens, in
each answer's usage), and the max/mean ratio of the workers' time-averaged in-flight load (sampled on the
gateway's /workers while the trace runs).

    python benchmarks/bench_routing.py [--model DIR] [--engines 4] [--tenants 16] [--turns 4]

Without --model it builds a tiny random-weight Llama (routing quality does not depend on the weights);
the engines' KV pools are kept small (--kv-tokens) so that where prefixes land matters.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import uvloop
import yaml

from sglang_gw.bench.report import summarize
from sglang_gw.bench.runner import BenchConfig, Load, run_bench
from sglang_gw.bench.workloads import LengthRange, MultiTurnWorkload
from sglang_gw.testing import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent


async def sample_load(session: aiohttp.ClientSession, url: str, workers: int, done: asyncio.Event) -> list[float]:
    """Each worker's in-flight requests, averaged over samples every 20 ms until `done`."""
    sums, samples = [0.0] * workers, 0
    while not done.is_set():
        async with session.get(url + "/workers") as resp:
            for i, w in enumerate((await resp.json())["workers"]):
                sums[i] += w["inflight"]
        samples += 1
        await asyncio.sleep(0.02)
    return [s / max(samples, 1) for s in sums]


async def run_trace(url: str, engines: list[str], config: BenchConfig) -> dict:
    async with aiohttp.ClientSession() as session:
        for e in engines:
            async with session.post(e + "/flush_cache") as resp:
                assert resp.status == 200
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_load(session, url, len(engines), done))
        run = await run_bench(config, progress=False)
        done.set()
        mean_loads = await sampler
    result = summarize(config, run)
    assert result["requests"]["errors"] == 0, result["error_examples"]
    mean = sum(mean_loads) / len(mean_loads)
    return {"hit_rate": result["prefix_cache_hit_rate"],
            "load_ratio": max(mean_loads) / mean if mean else float("nan")}


def run_policy(policy: str, engines: list[str], trace: MultiTurnWorkload, concurrency: int, model: str,
               processes: int = 1) -> dict:
    port = free_port()
    config = {"port": port, "workers": [{"url": u, "name": f"e{i}"} for i, u in enumerate(engines)],
              "policy": {"name": policy}, "health": {"interval": 1.0}, "processes": processes}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw.cli", "gateway", "--config", f.name,
                             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/ready", proc)
        bench = BenchConfig(url=url, workload=trace, load=Load(request_rate=float("inf"), max_concurrency=concurrency),
                            backend="openai-chat", model=model, temperature=0.0, seed=1)
        return uvloop.run(run_trace(url, engines, bench))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: a tiny random Llama built here)")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kv-tokens", type=int, default=3000, help="KV pool per engine, in tokens")
    ap.add_argument("--policies", default="prefix_affinity,round_robin,least_conn,power_of_two")
    ap.add_argument("--processes", default="1", help="gateway processes to run each policy with, e.g. 1,2 "
                    "(more than 1: relays sharing the port, one routing state)")
    args = ap.parse_args()

    model_dir = args.model
    if model_dir is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_model  # the same tiny model the tests use

        model_dir = str(build_tiny_model("llama", Path(tempfile.mkdtemp()) / "tiny-llama"))
    trace = MultiTurnWorkload(conversations=args.tenants, turns=args.turns, system_prompts=args.tenants,
                              system_len=120, input_len=LengthRange(12, 12), output_len=LengthRange(8, 8))

    procs, urls = [], []
    for _ in range(args.engines):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sglang_gw.cli", "engine", "--model", model_dir, "--port", str(port),
             "--served-model-name", "m", "--num-threads", "1", "--max-total-tokens", str(args.kv_tokens),
             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs):
            wait_http(url + "/health", proc)
        print(f"{args.engines} engines ({args.kv_tokens}-token KV pools), {args.tenants} tenants x {args.turns} "
              f"turns, concurrency {args.concurrency}")
        for policy in args.policies.split(","):
            for processes in map(int, args.processes.split(",")):
                r = run_policy(policy, urls, trace, args.concurrency, "m", processes)
                print(f"{policy:16s} processes {processes}: engine-reported prefix-cache hit rate {r['hit_rate']:.3f}"
                      f"   max/mean in-flight {r['load_ratio']:.2f}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
