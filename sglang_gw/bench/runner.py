"""Driving the load: which API a URL speaks, and the sessions sent in a closed loop (a fixed number of
sessions at once) or an open loop (sessions starting at Poisson arrivals, optionally capped in flight)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from sglang_gw.bench.client import BACKENDS, Client, RequestResult
from sglang_gw.bench.workloads import Session, Workload, planned_requests


@dataclass(frozen=True)
class Load:
    """Closed loop: `concurrency` sessions at once, each starting when one ends. Open loop: sessions start
    at `request_rate` per second (exponential gaps; inf: all at once), with at most `max_concurrency`
    requests in flight (the rest wait for a slot). For multi-turn, a session is a whole conversation."""

    concurrency: int | None = None
    request_rate: float | None = None
    max_concurrency: int | None = None

    def __post_init__(self):
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("give either concurrency (closed loop) or request_rate (open loop)")
        if self.max_concurrency is not None and self.request_rate is None:
            raise ValueError("max_concurrency caps an open loop (request_rate); a closed loop's concurrency is "
                             "its limit")


@dataclass(frozen=True)
class BenchConfig:
    url: str
    workload: Workload
    load: Load
    backend: str = "auto"   # auto | openai-chat | openai-completions | sglang
    model: str | None = None  # default: the first id of GET /v1/models (OpenAI backends)
    api_key: str | None = field(default=None, repr=False)
    stream: bool = True
    seed: int = 0
    timeout_s: float = 600.0  # per request
    temperature: float | None = None  # None: the server's default
    label: str | None = None  # names the run in comparisons


@dataclass(frozen=True)
class BenchRun:
    backend: str
    model: str
    results: tuple[RequestResult, ...]
    started: float   # perf_counter at the first request
    finished: float  # perf_counter when the last one ended
    client_cpu_s: float  # this process's CPU time over the run: the load generator's own cost
    interrupted: bool = False  # stopped early (Ctrl-C): the results hold the requests that had ended


class DetectError(Exception):
    """The URL's API could not be found out (or the model listed)."""


async def _get_json(http: aiohttp.ClientSession, url: str, headers: dict) -> tuple[int, object]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, (await resp.json(content_type=None) if resp.status == 200 else await resp.text())


async def resolve_target(http: aiohttp.ClientSession, config: BenchConfig) -> tuple[str, str]:
    """(backend, model): `auto` is openai-chat where GET /v1/models answers, else sglang where
    /get_model_info does; the model is the first one listed unless given."""
    url, headers = config.url.rstrip("/"), {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    backend, model = config.backend, config.model
    if backend == "sglang" or (backend != "auto" and model):
        return backend, model or ""  # /generate takes no model
    try:
        status, answer = await _get_json(http, url + "/v1/models", headers)
        if status == 200 and answer.get("data"):
            return ("openai-chat" if backend == "auto" else backend), model or answer["data"][0]["id"]
        if backend != "auto":
            raise DetectError(f"GET {url}/v1/models: HTTP {status}: {str(answer)[:200]} (give --model)")
        status, answer = await _get_json(http, url + "/get_model_info", headers)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError) as exc:
        raise DetectError(f"{url}: {type(exc).__name__}: {exc}") from None
    if status != 200:
        raise DetectError(f"{url}: neither /v1/models nor /get_model_info answers 200 "
                          f"(HTTP {status}: {str(answer)[:200]}); give --backend")
    return "sglang", model or ""


async def run_bench(config: BenchConfig, progress: bool = True) -> BenchRun:
    rng = random.Random(config.seed)
    sessions = config.workload.sessions(rng)
    # One pool for the whole run, as many connections as requests may be in flight.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        backend, model = await resolve_target(http, config)
        sampling = {} if config.temperature is None else {"temperature": config.temperature}
        client = Client(http, config.url, BACKENDS[backend], model, config.stream, config.api_key, sampling)
        bar = tqdm(total=planned_requests(sessions), unit="req", desc=f"bench {backend}", disable=not progress,
                   dynamic_ncols=True)
        results: list[RequestResult] = []
        errors = 0

        async def conversation(session: Session, slot: asyncio.Semaphore | None) -> None:
            nonlocal errors
            history: list[tuple[str, str]] = []
            for i, turn in enumerate(session.turns):
                if i and session.think_time_s:
                    await asyncio.sleep(session.think_time_s)
                async with slot or contextlib.nullcontext():
                    result = await client.send(session, history, turn)
                results.append(result)
                history.append((turn.text, result.text))  # a failed turn continues without an answer
                bar.update(1)
                if result.error is not None:
                    errors += 1
                    bar.set_postfix_str(f"errors {errors}", refresh=False)

        cpu_before = _cpu_s()
        started = time.perf_counter()
        interrupted = False
        try:
            if config.load.concurrency is not None:
                await _closed_loop(sessions, config.load.concurrency, conversation)
            else:
                await _open_loop(sessions, config.load, rng, conversation)
        except asyncio.CancelledError:  # Ctrl-C (asyncio cancels the main task): report what ended so far
            interrupted = True
        finished = time.perf_counter()
        cpu_s = _cpu_s() - cpu_before
        bar.close()
    return BenchRun(backend, model, tuple(results), started, finished, cpu_s, interrupted)


async def _closed_loop(sessions: list[Session], concurrency: int, conversation) -> None:
    pending = iter(sessions)

    async def user() -> None:
        for session in pending:  # shared: each user takes the next session when its last one ends
            await conversation(session, None)

    await asyncio.gather(*(user() for _ in range(concurrency)))


async def _open_loop(sessions: list[Session], load: Load, rng: random.Random, conversation) -> None:
    slot = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    started, due = [], time.perf_counter()
    try:
        for session in sessions:
            started.append(asyncio.create_task(conversation(session, slot)))
            if load.request_rate != float("inf"):
                # Sleep until the next arrival's absolute time: sleeps overshoot, and the rate must not drift.
                due += rng.expovariate(load.request_rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
        await asyncio.gather(*started)
    finally:
        for task in started:  # interrupted: the sessions still running end with it
            task.cancel()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
