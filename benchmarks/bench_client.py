"""The load generator's own cost (issue #14): how many requests/s `sglang-gw bench` can drive, and the CPU
it spends per request, against the zero-delay fake server (sglang_gw/bench/fake_server.py) in another
process (pinned to another core where there is one).

For each API and streaming on/off: --requests (5000) random-workload requests of --tokens (16) output
tokens at --concurrency (64), closed loop. Reports requests/s, output chunks/s, the client's CPU per
request (this process, over the run) and the fake server's CPU per request (/proc): when the server's
core is saturated, requests/s is the fake's ceiling, and the client's CPU per request is the figure
that says what the client could drive alone (1 / CPU per request, per core).

    python benchmarks/bench_client.py [--requests 5000] [--concurrency 64] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os

import uvloop

from sglang_gw.bench import fake_server
from sglang_gw.bench.report import summarize
from sglang_gw.bench.runner import BenchConfig, Load, run_bench
from sglang_gw.bench.workloads import LengthRange, RandomWorkload
from sglang_gw.testing import cpu_seconds, stop_process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16, help="output tokens (chunks) per request")
    args = ap.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    server, url = fake_server.spawn(core=cores[-1] if len(cores) > 1 else None)
    if len(cores) > 1:
        os.sched_setaffinity(0, cores[:-1])  # the client on the other cores
    try:
        workload = RandomWorkload(num_requests=args.requests, input_len=LengthRange(32, 32),
                                  output_len=LengthRange(args.tokens, args.tokens))
        print(f"{args.requests} requests x {args.tokens} tokens, concurrency {args.concurrency}; client on cores "
              f"{cores[:-1] or cores}, fake server on {cores[-1:]}")
        print(f"{'API':20}{'stream':>8}{'req/s':>10}{'chunks/s':>11}{'client CPU ms/req':>19}"
              f"{'server CPU ms/req':>19}")
        for backend in ("openai-chat", "openai-completions", "sglang"):
            for stream in (True, False):
                config = BenchConfig(url=url, workload=workload, load=Load(concurrency=args.concurrency),
                                     backend=backend, model="fake", stream=stream)
                server_before = cpu_seconds([server.pid])
                result = summarize(config, uvloop.run(run_bench(config, progress=False)))  # as the CLI runs it
                server_ms = 1000 * (cpu_seconds([server.pid]) - server_before) / args.requests
                assert result["requests"]["errors"] == 0, result["error_examples"]
                chunks = result["throughput"]["output_tokens_per_s"] if stream else 0
                print(f"{backend:20}{'yes' if stream else 'no':>8}{result['throughput']['requests_per_s']:>10,.0f}"
                      f"{chunks:>11,.0f}{result['client']['cpu_ms_per_request']:>19.3f}{server_ms:>19.3f}", flush=True)
    finally:
        stop_process(server)


if __name__ == "__main__":
    main()
