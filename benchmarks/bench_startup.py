"""Start-up wall time and memory of the processes that run no model, for this tree and earlier commits.

For each tree (the installed working tree ".", or a git commit laid out under the `sglang_gw`
namespace in a temporary directory and put first on PYTHONPATH):

1. `sglang-gw --help` and `sglang-gw check-config config/default.yaml`: wall time (median of --runs).
2. `sglang-gw gateway` in front of one running engine (the embedded SmolLM2): spawn → listening
   (/health 200) and → the engine routable (/ready 200, its chat template learned); RSS and peak RSS
   once ready and after --requests chat requests through it.
3. `sglang-gw serve` with one engine: the same for the serve parent process (the engine is its child
   and is not counted).

    python benchmarks/bench_startup.py --compare 1c479a8 [--runs 5] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import aiohttp
import yaml

from sglang_gw.testing import free_port, stop_process, wait_http

REPO = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"
# The repository's folders and the import names they install as (pyproject's package-dir).
NAMESPACE = {"engine": "engine", "gateway": "gateway", "supervisor": "supervisor", "config": "config"}
# Measured processes run outside the repository: `python -m` puts the working directory first on
# sys.path, where the checkout's own `sglang_gw/` folder would shadow the tree being measured.
OUTSIDE = tempfile.gettempdir()


def layout(commit: str, root: Path) -> dict[str, str]:
    """The commit's sources laid out as the installed `sglang_gw` package; the environment that uses it."""
    src = root / "src"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(src)
    package = root / "site" / "sglang_gw"
    package.mkdir(parents=True)
    for item in (src / "sglang_gw").iterdir():
        (package / item.name).symlink_to(item)
    for folder, name in NAMESPACE.items():
        (package / name).symlink_to(src / folder)
    return {"PYTHONPATH": str(root / "site"), "SGLANG_GW_CONFIGS": str(src / "config")}


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def timed_command(args: list[str], env: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sglang_gw", *args], env=env, check=True, capture_output=True,
                       cwd=OUTSIDE)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def chat_load(url: str, requests: int) -> None:
    async with aiohttp.ClientSession() as session:
        async def one(i: int):
            body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"request {i}"}]}
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

        for start in range(0, requests, 16):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 16, requests))))


def measure_process(argv: list[str], env: dict, url: str, requests: int) -> dict:
    """Spawn → listening → ready, and the process's memory once ready and after a burst of requests."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=OUTSIDE)
    try:
        wait_http(url + "/health", proc, 60)
        listening = time.perf_counter() - start
        wait_http(url + "/ready", proc, 600)
        ready = time.perf_counter() - start
        rss_ready, _ = rss_kib(proc.pid)
        asyncio.run(chat_load(url, requests))
        rss_loaded, peak = rss_kib(proc.pid)
    finally:
        stop_process(proc, 120)
    return {"listening_s": listening, "ready_s": ready, "rss_ready_mib": rss_ready / 1024,
            "rss_after_requests_mib": rss_loaded / 1024, "peak_rss_mib": peak / 1024}


def measure_tree(name: str, env: dict, engine_url: str, args) -> dict:
    configs = Path(env.get("SGLANG_GW_CONFIGS", REPO / "config"))
    out = {"tree": name,
           "help_s": timed_command(["--help"], env, args.runs),
           "check_config_s": timed_command(["check-config", str(configs / "default.yaml")], env, args.runs)}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        gateway_yaml = Path(tmp) / "gateway.yaml"
        gateway_yaml.write_text(yaml.safe_dump({"port": port, "workers": [{"url": engine_url, "name": "e0"}],
                                                "health": {"interval": 0.5}}))
        gateway = measure_process(["gateway", "--config", str(gateway_yaml), "--log-format", "json"], env,
                                  f"http://127.0.0.1:{port}", args.requests)
        out.update({f"gateway_{k}": v for k, v in gateway.items()})
        port = free_port()
        serve = measure_process(["serve", str(configs / "default.yaml"), "--set", f"gateway.port={port}",
                                 "--set", "engines.0.count=1", "--set", f"engines.0.base_port={free_port()}",
                                 "--set", "gateway.health.interval=0.5", "--set", "logging.format=json"],
                                env, f"http://127.0.0.1:{port}", args.requests)
        out.update({f"serve_{k}": v for k, v in serve.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", action="append", default=[], metavar="COMMIT",
                    help="also measure this commit (repeatable); the working tree is always measured")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()

    engine_port = free_port()
    engine = subprocess.Popen([sys.executable, "-m", "sglang_gw", "engine", "--model", MODEL, "--port",
                               str(engine_port), "--num-threads", "1", "--log-format", "json"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine_url = f"http://127.0.0.1:{engine_port}"
    results = []
    try:
        wait_http(engine_url + "/health", engine, 600)
        with tempfile.TemporaryDirectory() as tmp:
            trees = [(commit, layout(commit, Path(tmp) / commit)) for commit in args.compare]
            for name, extra in [*trees, ("working tree", {})]:
                print(f"measuring {name} ...", file=sys.stderr, flush=True)
                results.append(measure_tree(name, dict(os.environ, **extra), engine_url, args))
    finally:
        stop_process(engine, 120)

    keys = [k for k in results[0] if k != "tree"]
    print(f"\n{'':34}" + "".join(f"{r['tree']:>16}" for r in results) +
          ("   after/before" if len(results) > 1 else ""))
    for key in keys:
        values = [r[key] for r in results]
        ratio = f"{values[-1] / values[0]:>14.2f}x" if len(results) > 1 and values[0] else ""
        print(f"{key:34}" + "".join(f"{v:>16.2f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
