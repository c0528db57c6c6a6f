"""Side-by-side benchmark (issue #10): the same workloads through our engine server and through any
OpenAI-compatible server given by URL (the "peer", e.g. vLLM-CPU from ../shared/peers/vllm-cpu.sh), in
one run, with the ratios.

Every request is a streamed /v1/completions call (text prompt, temperature 0, ignore_eos, stream_options
include_usage), so both servers see identical text and generate exactly max_tokens tokens.

  (a) mixed:  --requests (64) requests sent at once; prompts of 24-200 words drawn from a fixed word
              list, 16-128 output tokens; seeded.
  (b) prefix: the same requests, each behind one shared 400-word prefix.
  (c) chat:   a multi-turn trace: --requests/4 users (16) share one ~150-word system prompt and take
              --turns (4) turns each; a turn's prompt is the previous turn's prompt + the answer that
              server returned + a new user message (plain "User:/Assistant:" text). Users run at once,
              a user's turns one after another; 32-64 output tokens per turn.

Metrics per server and workload: wall time, output tokens/s (usage.completion_tokens of the final chunk;
max_tokens where a server reports no usage), TTFT p50/p99 (request sent -> first chunk with non-empty
text), prompt and cached prompt tokens as the server reports them. For our server also the start-up time
(spawn -> /health 200, model load and warm-up included) and its peak RSS (VmHWM) after all workloads.

Order: one warm-up request per server, then per workload ours then the peer (interleaved per workload
rather than all of ours then all of the peer's, so that a slow drift in machine load, e.g. another job
on the same cores, hits both sides of each ratio alike). Each server's prefix cache is flushed before
each workload (ours: POST /flush_cache; the peer: /reset_prefix_cache or /flush_cache where it has one;
vLLM exposes /reset_prefix_cache only with VLLM_SERVER_DEV_MODE=1), so (b) and (c) measure sharing
within the workload. Even unflushed, the workloads share no prefix with one another. Both servers stay up
for the whole run; the idle one should cost little, but give them the same cores (vllm-cpu.sh binds 0-1).

    ../shared/peers/vllm-cpu.sh start float32 31100
    python benchmarks/bench_engine.py --peer-url http://127.0.0.1:31100 --peer-name vllm-cpu --json out.json
    python benchmarks/bench_engine.py --engine-arg=--kv-cache-gib=2 --workloads a,b   # ours only, no peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tqdm import tqdm

from sglang_gw.testing import free_port, sse_event, stop_process, wait_http

WORDS = list(dict.fromkeys("""the of and to in is was for that with as on by at from his her they this which but be have had
not are were all their one there an can would when so who more will what out them time about into has up
only other some could its these two then people first than may like been made after over any new very
also years where most much did because through state many each way before great well long between little
those under should world same both life day own house three being under last later while water never
place small during work part city found year number back public every still high school without given
around three place river north south early light night water power large order family might country city
against point found since government name second system small music world war head hand side road""".split()))  # each once
WORKLOADS = {"a": "mixed", "b": "prefix", "c": "chat"}


def make_workload(n: int, vocab: int, seed: int, in_range=(32, 512), out_range=(16, 256)):
    """Token-id prompts and output lengths: the offline-vs-HTTP workload of bench_server.py (issue #3)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    return prompts, [rng.randint(*out_range) for _ in range(n)]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def mixed(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(a): (prompt, max_tokens) pairs."""
    rng = random.Random(seed)
    return [(words(rng, rng.randint(24, 200)), rng.randint(16, 128)) for _ in range(n)]


def shared_prefix(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(b): the requests of (a), each behind the same 400-word prefix."""
    prefix = words(random.Random(seed + 1), 400)
    return [(f"{prefix}\n\n{prompt}", out) for prompt, out in mixed(n, seed)]


def chat_trace(users: int, turns: int, seed: int = 0) -> tuple[str, list[list[tuple[str, int]]]]:
    """(c): the shared system prompt, and per user its turns' (user message, max_tokens)."""
    rng = random.Random(seed + 2)
    system = words(rng, 150)
    return system, [[(words(rng, rng.randint(8, 40)), rng.randint(32, 64)) for _ in range(turns)]
                    for _ in range(users)]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


@dataclass
class Server:
    name: str
    url: str
    model: str = ""
    proc: subprocess.Popen | None = None
    startup_s: float | None = None
    log: str | None = None  # our spawned engine's output


async def complete(session: aiohttp.ClientSession, server: Server, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: its TTFT, text, and token counts."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, usage = None, [], None
    async with session.post(server.url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            event = sse_event(line)
            if not isinstance(event, dict):
                continue
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(choice["text"])
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"ttft": ttft, "text": "".join(text), "usage": usage is not None,
            "tokens": usage["completion_tokens"] if usage else max_tokens,
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": details.get("cached_tokens")}


async def flush(session: aiohttp.ClientSession, server: Server) -> bool:
    """Empty the server's prefix cache; False when it has no endpoint for that (or stays busy)."""
    for _ in range(20):
        busy = False
        for path in ("/flush_cache", "/reset_prefix_cache"):
            try:
                async with session.post(server.url + path) as resp:
                    if resp.status == 200:
                        return True
                    busy |= resp.status == 400  # ours: requests still finishing
            except aiohttp.ClientError:
                pass
        if not busy:
            return False
        await asyncio.sleep(0.25)
    return False


async def run_workload(server: Server, key: str, args) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        flushed = await flush(session, server)
        if key == "c":
            system, users = chat_trace(max(1, args.requests // 4), args.turns, args.seed)
            total = sum(map(len, users))
        else:
            requests = (mixed if key == "a" else shared_prefix)(args.requests, args.seed)
            total = len(requests)
        bar = tqdm(total=total, desc=f"({key}) {server.name}", unit="req", file=sys.stderr, leave=False)

        async def one(prompt: str, max_tokens: int) -> dict:
            result = await complete(session, server, prompt, max_tokens)
            bar.update(1)
            return result

        async def user(turns: list[tuple[str, int]]) -> list[dict]:
            prompt, results = f"System: {system}", []
            for message, max_tokens in turns:
                prompt += f"\n\nUser: {message}\nAssistant:"
                results.append(await one(prompt, max_tokens))
                prompt += results[-1]["text"]
            return results

        start = time.perf_counter()
        if key == "c":
            results = [r for rs in await asyncio.gather(*(user(turns) for turns in users)) for r in rs]
        else:
            results = await asyncio.gather(*(one(p, n) for p, n in requests))
        wall = time.perf_counter() - start
        bar.close()
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    cached = [r["cached_tokens"] for r in results if r["cached_tokens"] is not None]
    return {"requests": len(results), "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "no_text": len(results) - len(ttfts), "usage_reported": all(r["usage"] for r in results),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
            "cached_tokens": sum(cached) if cached else None, "cache_flushed": flushed}


async def served_model(server: Server) -> None:
    """Learn the served model id, and warm the server up with one short request."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(server.url + "/v1/models") as resp:
            server.model = (await resp.json())["data"][0]["id"]
        await complete(session, server, "Warm up.", 4)


def spawn_ours(args) -> Server:
    port = free_port()
    extra = [flag for arg in args.engine_arg for flag in shlex.split(arg)]
    cmd = [sys.executable, "-m", "sglang_gw", "engine", "--model", args.model, "--port", str(port),
           "--num-threads", str(args.threads), "--dtype", args.dtype, "--log-format", "json", *extra]
    log = tempfile.NamedTemporaryFile(prefix="bench_engine-", suffix=".log", delete=False)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = Server("ours", f"http://127.0.0.1:{port}", proc=proc, log=log.name)
    try:
        wait_http(server.url + "/health", proc, 600)
    except (RuntimeError, TimeoutError) as exc:
        stop_process(proc)
        raise SystemExit(f"our engine did not start ({exc}); its log: {log.name}") from None
    server.startup_s = time.perf_counter() - start
    return server


def memory_mib(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024, "rss_mib": int(fields["VmRSS"].split()[0]) / 1024}


def ratios(ours: dict, peer: dict) -> dict:
    """Every ratio > 1 means ours is better."""
    div = lambda a, b: a / b if a is not None and b else None
    return {"output_tok_s": div(ours["output_tok_s"], peer["output_tok_s"]), "wall_s": div(peer["wall_s"], ours["wall_s"]),
            "ttft_p50_ms": div(peer["ttft_p50_ms"], ours["ttft_p50_ms"]),
            "ttft_p99_ms": div(peer["ttft_p99_ms"], ours["ttft_p99_ms"])}


COLUMNS = [("wall_s", "wall s", ".1f"), ("output_tok_s", "out tok/s", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
           ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("prompt_tokens", "prompt tok", ","), ("cached_tokens", "cached tok", ",")]


def print_table(key: str, rows: dict[str, dict], ratio: dict | None) -> None:
    first = next(iter(rows.values()))
    print(f"\n({key}) {WORKLOADS[key]}: {first['requests']} requests, {first['output_tokens']:,} output tokens")
    print(f"{'':24}" + "".join(f"{head:>13}" for _, head, _ in COLUMNS))
    for name, row in rows.items():
        notes = ("" if row["usage_reported"] else "  (no usage: max_tokens counted)") + \
                ("" if row["cache_flushed"] else "  (cache not flushed)") + \
                (f"  ({row['no_text']} without text)" if row["no_text"] else "")
        print(f"{name:24}" + "".join(f"{'-' if row[c] is None else format(row[c], f):>13}" for c, _, f in COLUMNS)
              + notes)
    if ratio:
        print(f"{'ratio, >1: ours better':24}" + "".join(
            f"{'-' if ratio.get(c) is None else format(ratio[c], '.2f') + 'x':>13}" for c, _, _ in COLUMNS[:4])
              + "   (tok/s: ours/peer; wall, TTFT: peer/ours)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-url", help="an OpenAI-compatible server to compare with (none: ours only)")
    ap.add_argument("--peer-name", default="peer")
    ap.add_argument("--ours-url", help="benchmark this running server instead of spawning one "
                                       "(no start-up time or RSS then)")
    ap.add_argument("--workloads", default="a,b,c", help="comma-separated, from a (mixed), b (prefix), c (chat)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="the model our engine serves")
    ap.add_argument("--threads", type=int, default=2, help="our engine's --num-threads")
    ap.add_argument("--dtype", default="float32", help="our engine's --dtype")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="FLAGS",
                    help="extra flags for our engine, e.g. --engine-arg=--kv-cache-gib=2 (repeatable)")
    ap.add_argument("--requests", type=int, default=64, help="requests of (a) and (b); (c) has a quarter as many users")
    ap.add_argument("--turns", type=int, default=4, help="turns per user in (c)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    if unknown := set(keys) - set(WORKLOADS):
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.peer_name == "ours":
        ap.error("--peer-name: 'ours' names our engine")

    ours = Server("ours", args.ours_url.rstrip("/")) if args.ours_url else spawn_ours(args)
    servers = [ours] + ([Server(args.peer_name, args.peer_url.rstrip("/"))] if args.peer_url else [])
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "servers": {}, "workloads": {}}
    try:
        for server in servers:
            asyncio.run(served_model(server))
        for key in keys:
            rows = {s.name: asyncio.run(run_workload(s, key, args)) for s in servers}
            ratio = ratios(*rows.values()) if len(servers) == 2 else None
            results["workloads"][key] = {"name": WORKLOADS[key], **rows, "ratios": ratio}
            print_table(key, rows, ratio)
        for server in servers:
            info = {"url": server.url, "model": server.model}
            if server.proc is not None:
                info.update(startup_s=server.startup_s, log=server.log, **memory_mib(server.proc.pid))
            results["servers"][server.name] = info
    finally:
        if ours.proc is not None:
            stop_process(ours.proc)
    if ours.proc is not None:
        info = results["servers"]["ours"]
        print(f"\nours: start-up {info['startup_s']:.1f} s (spawn -> /health 200), peak RSS {info['peak_rss_mib']:,.0f} "
              f"MiB ({args.threads} threads, {args.dtype}{', ' + ' '.join(args.engine_arg) if args.engine_arg else ''})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
