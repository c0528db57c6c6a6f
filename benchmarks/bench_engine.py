"""Side-by-side benchmark (issue #10): the same workloads through our engine server and through any
OpenAI-compatible server given by URL (the "peer", e.g. vLLM-CPU from ../shared/peers/vllm-cpu.sh), in
one run, with the ratios. The load and the measurements are `sglang-gw bench`'s (sglang_gw/bench): this
script spawns our engine, flushes caches and runs bench's workloads against both servers.

Every request is a streamed /v1/completions call (bench's openai-completions backend: text prompt,
temperature 0, ignore_eos, usage in the last chunk), so both servers see identical text and generate
exactly max_tokens tokens.

  (a) mixed:  bench `random`: --requests (64) prompts of 24-200 words, 16-128 output tokens, all at once.
  (b) prefix: bench `shared-prefix`: the same sizes, every request behind one shared 400-word prefix.
  (c) chat:   bench `multi-turn`: --requests/4 conversations (16) behind one ~150-word system prompt, --turns
              (4) turns each, 8-40-word messages, 32-64 output tokens; a turn's prompt is the previous
              turn's prompt + the answer that server returned + the new message. Conversations at once.

Per server and workload: bench's summary (throughput, TTFT / ITL / E2E percentiles, prompt and cached
tokens as the server reports them), then bench's comparison table (ours / peer, with which way is
better). For our server also the start-up time (spawn -> /health 200, model load and warm-up included)
and its peak RSS (VmHWM) after all workloads.

Order: one warm-up request per server, then per workload ours then the peer (interleaved per workload, so
that a slow drift in machine load hits both sides of each ratio alike). Each server's prefix cache is
flushed before each workload (ours: POST /flush_cache; the peer: /reset_prefix_cache or /flush_cache
where it has one; vLLM exposes /reset_prefix_cache only with VLLM_SERVER_DEV_MODE=1), so (b) and (c)
measure sharing within the workload. Give both servers the same cores (vllm-cpu.sh binds 0-1).

    ../shared/peers/vllm-cpu.sh start float32 31100
    python benchmarks/bench_engine.py --peer-url http://127.0.0.1:31100 --peer-name vllm-cpu --json out.json
    python benchmarks/bench_engine.py --engine-arg=--kv-cache-gib=2 --workloads a,b   # ours only, no peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from sglang_gw.bench.report import compare, format_summary, summarize
from sglang_gw.bench.runner import BenchConfig, Load, run_bench
from sglang_gw.bench.workloads import LengthRange, MultiTurnWorkload, RandomWorkload, SharedPrefixWorkload
from sglang_gw.testing import free_port, stop_process, wait_http

WORKLOADS = {"a": "mixed", "b": "prefix", "c": "chat"}


def workload(key: str, args):
    """(bench workload, sessions at once) of (a), (b) or (c)."""
    prompt, output = LengthRange(24, 200), LengthRange(16, 128)
    if key == "a":
        return RandomWorkload(num_requests=args.requests, input_len=prompt, output_len=output), args.requests
    if key == "b":
        return SharedPrefixWorkload(groups=1, group_size=args.requests, system_len=400, input_len=prompt,
                                    output_len=output), args.requests
    users = max(1, args.requests // 4)
    return MultiTurnWorkload(conversations=users, turns=args.turns, system_len=150, input_len=LengthRange(8, 40),
                             output_len=LengthRange(32, 64)), users


async def flush(url: str) -> bool:
    """Empty the server's prefix cache; False when it has no endpoint for that (or stays busy)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            busy = False
            for path in ("/flush_cache", "/reset_prefix_cache"):
                try:
                    async with http.post(url + path) as resp:
                        if resp.status == 200:
                            return True
                        busy |= resp.status == 400  # ours: requests still finishing
                except aiohttp.ClientError:
                    pass
            if not busy:
                return False
            await asyncio.sleep(0.25)
    return False


def bench(url: str, name: str, key: str, args) -> dict:
    load_of, at_once = workload(key, args)
    config = BenchConfig(url=url, workload=load_of, load=Load(concurrency=at_once), backend="openai-completions",
                         temperature=0.0, seed=args.seed, label=name)
    result = summarize(config, uvloop.run(run_bench(config)))
    if result["requests"]["errors"]:  # figures over only the requests that completed would mislead
        kind, detail = next(iter(result["error_examples"].items()))
        sys.exit(f"{name}, ({key}) {WORKLOADS[key]}: {result['requests']['errors']} requests failed; "
                 f"first {kind}: {detail}")
    return result


def spawn_ours(args) -> tuple[subprocess.Popen, str, float, str]:
    """(process, URL, start-up seconds, log path) of our engine."""
    port = free_port()
    extra = [flag for arg in args.engine_arg for flag in shlex.split(arg)]
    cmd = [sys.executable, "-m", "sglang_gw", "engine", "--model", args.model, "--port", str(port),
           "--num-threads", str(args.threads), "--dtype", args.dtype, "--log-format", "json", *extra]
    log = tempfile.NamedTemporaryFile(prefix="bench_engine-", suffix=".log", delete=False)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, 600)
    except (RuntimeError, TimeoutError) as exc:
        stop_process(proc)
        raise SystemExit(f"our engine did not start ({exc}); its log: {log.name}") from None
    return proc, url, time.perf_counter() - start, log.name


def memory_mib(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024, "rss_mib": int(fields["VmRSS"].split()[0]) / 1024}


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

    proc, ours_url, startup_s, log = (None, args.ours_url.rstrip("/"), None, None) if args.ours_url else spawn_ours(args)
    servers = {"ours": ours_url, **({args.peer_name: args.peer_url.rstrip("/")} if args.peer_url else {})}
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "servers": {name: {"url": url} for name, url in servers.items()}, "workloads": {}}
    try:
        warm_up = RandomWorkload(1, LengthRange(4, 4), LengthRange(4, 4))
        for name, url in servers.items():  # warm-up: one short request each
            run = uvloop.run(run_bench(BenchConfig(url=url, workload=warm_up, load=Load(concurrency=1),
                                                   backend="openai-completions"), progress=False))
            if failed := [r for r in run.results if r.error is not None]:
                sys.exit(f"{name}: the warm-up request failed: {failed[0].error}: {failed[0].error_detail}")
        for key in keys:
            rows = {}
            for name, url in servers.items():
                flushed = uvloop.run(flush(url))
                rows[name] = dict(bench(url, name, key, args), cache_flushed=flushed)
                print(f"\n({key}) {WORKLOADS[key]}" + ("" if flushed else "  (cache not flushed)"))
                print(format_summary(rows[name]))
            results["workloads"][key] = {"name": WORKLOADS[key], **rows}
            if len(rows) == 2:  # the peer first: the ratio column is ours / peer
                print(f"\n({key}) {WORKLOADS[key]}, side by side:")
                print(compare([rows[args.peer_name], rows["ours"]], [args.peer_name, "ours"]))
        if proc is not None:
            results["servers"]["ours"].update(startup_s=startup_s, log=log, **memory_mib(proc.pid))
    finally:
        if proc is not None:
            stop_process(proc)
    if proc is not None:
        info = results["servers"]["ours"]
        print(f"\nours: start-up {startup_s:.1f} s (spawn -> /health 200), peak RSS {info['peak_rss_mib']:,.0f} "
              f"MiB ({args.threads} threads, {args.dtype}{', ' + ' '.join(args.engine_arg) if args.engine_arg else ''})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
