"""Routing quality (issue #4): a multi-turn, multi-tenant chat trace through the gateway over N engines,
once per policy, against the same engines (caches flushed in between).

Reports, per policy: the aggregate prefix-cache hit rate the *engines* report (cached / prompt tokens,
from their /metrics), and the max/mean ratio of the workers' time-averaged in-flight load.

    python benchmarks/bench_routing.py [--model DIR] [--engines 4] [--tenants 16] [--turns 4]

Without --model it builds a tiny random-weight Llama (routing quality does not depend on the weights);
the engines' KV pools are kept small (--kv-tokens) so that where prefixes land matters.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml

from sglang_gw.testing import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(cached, prompt) token counters of one engine."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["sglang:cached_tokens_total"], values["sglang:prompt_tokens_total"]


def make_trace(tenants: int, turns: int, seed: int) -> list[list[tuple[int, str]]]:
    """Per turn, the (tenant, user message) pairs in a shuffled order; each tenant has a long system prompt."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [[(t, " ".join(rng.choice(words) for _ in range(12))) for t in rng.sample(range(tenants), tenants)]
            for _ in range(turns)]


async def run_policy(policy: str, engines: list[str], trace, system_prompts, concurrency: int, model: str) -> dict:
    port = free_port()
    config = {"port": port, "workers": [{"url": u, "name": f"e{i}"} for i, u in enumerate(engines)],
              "policy": {"name": policy}, "health": {"interval": 1.0}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw.cli", "gateway", "--config", f.name,
                             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, url + "/ready", proc)
        async with aiohttp.ClientSession() as session:
            for e in engines:
                async with session.post(e + "/flush_cache") as resp:
                    assert resp.status == 200
            before = [await scrape(session, e) for e in engines]
            histories = {t: [{"role": "system", "content": p}] for t, p in enumerate(system_prompts)}
            load_sums, samples, done = [0.0] * len(engines), 0, asyncio.Event()

            async def sample_load():
                nonlocal samples
                while not done.is_set():
                    async with session.get(url + "/workers") as resp:
                        for i, w in enumerate((await resp.json())["workers"]):
                            load_sums[i] += w["inflight"]
                    samples += 1
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample_load())
            limit = asyncio.Semaphore(concurrency)

            async def one(tenant: int, message: str):
                async with limit:
                    history = histories[tenant] + [{"role": "user", "content": message}]
                    body = {"model": model, "messages": history, "max_tokens": 8, "temperature": 0}
                    async with session.post(url + "/v1/chat/completions", json=body) as resp:
                        out = await resp.json()
                    histories[tenant] = history + [{"role": "assistant",
                                                    "content": out["choices"][0]["message"]["content"]}]

            for turn in trace:  # a tenant's next turn starts after its previous one answered
                await asyncio.gather(*(one(t, m) for t, m in turn))
            done.set()
            await sampler
            after = [await scrape(session, e) for e in engines]
        cached = sum(a[0] - b[0] for a, b in zip(after, before))
        prompt = sum(a[1] - b[1] for a, b in zip(after, before))
        mean_loads = [s / max(samples, 1) for s in load_sums]
        mean = sum(mean_loads) / len(mean_loads)
        return {"hit_rate": cached / prompt, "load_ratio": max(mean_loads) / mean if mean else float("nan")}
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
    args = ap.parse_args()

    model_dir = args.model
    if model_dir is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_model  # the same tiny model the tests use

        model_dir = str(build_tiny_model("llama", Path(tempfile.mkdtemp()) / "tiny-llama"))
    rng = random.Random(0)
    system_prompts = [f"You are assistant number {t}. " + " ".join(
        rng.choice(["reply", "briefly", "with", "care", "and", "facts", "only"]) for _ in range(120))
        for t in range(args.tenants)]
    trace = make_trace(args.tenants, args.turns, seed=1)

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
            r = asyncio.run(run_policy(policy, urls, trace, system_prompts, args.concurrency, "m"))
            print(f"{policy:16s} engine-reported prefix-cache hit rate {r['hit_rate']:.3f}   "
                  f"max/mean in-flight {r['load_ratio']:.2f}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
