"""`sglang-gw bench`: against a fake server that streams at known delays (the measured TTFT and ITL are
those delays), and against a real `serve` on the tiny model (every workload, the three APIs, cache hit
rates as the engine reports them, the PNG and --compare)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ServeProcess, free_port, stop_process, wait_http
from sglang_gw.bench import fake_server
from sglang_gw.bench.command import WORKLOAD_FLAGS
from sglang_gw.bench.report import summarize
from sglang_gw.bench.runner import BenchConfig, Load, run_bench
from sglang_gw.bench.workloads import WORKLOADS, LengthRange, MultiTurnWorkload, RandomWorkload, settings_of
from sglang_gw.cli import build_parser

FAKE_TTFT, FAKE_ITL, FAKE_TOKENS = 0.25, 0.04, 6
RESULT_FIELDS = {"version", "label", "date", "url", "backend", "model", "stream", "seed", "workload", "load",
                 "duration_s", "interrupted", "requests", "errors", "error_examples", "tokens", "throughput",
                 "prefix_cache_hit_rate", "latency_ms", "client", "timeline"}


@pytest.fixture(scope="module")
def fake_url():
    proc, url = fake_server.spawn(FAKE_TTFT, FAKE_ITL)
    try:
        yield url
    finally:
        stop_process(proc)


def _bench(url: str, workload, load: Load = Load(concurrency=4), **settings) -> dict:
    config = BenchConfig(url=url, workload=workload, load=load, **settings)
    return summarize(config, asyncio.run(run_bench(config, progress=False)))


def _assert_all_completed(result: dict, planned: int) -> None:
    requests = result["requests"]
    assert requests["sent"] == planned == requests["completed"], (requests, result["error_examples"])


def _fake_workload(requests: int = 8) -> RandomWorkload:
    return RandomWorkload(num_requests=requests, input_len=LengthRange(5, 10),
                          output_len=LengthRange(FAKE_TOKENS, FAKE_TOKENS))


@pytest.mark.parametrize("backend", ["openai-chat", "openai-completions", "sglang"])
def test_ttft_and_itl_are_the_fake_servers_delays(fake_url, backend):
    result = _bench(fake_url, _fake_workload(), backend=backend)
    _assert_all_completed(result, 8)
    latency = result["latency_ms"]
    assert FAKE_TTFT * 1000 <= latency["ttft"]["p50"] <= FAKE_TTFT * 1000 + 40, latency["ttft"]
    assert abs(latency["itl"]["p50"] - FAKE_ITL * 1000) <= 10, latency["itl"]
    assert latency["itl"]["count"] == 8 * (FAKE_TOKENS - 1)
    assert abs(latency["tpot"]["p50"] - FAKE_ITL * 1000) <= 5, latency["tpot"]
    expected_e2e = (FAKE_TTFT + (FAKE_TOKENS - 1) * FAKE_ITL) * 1000
    assert expected_e2e <= latency["e2e"]["p50"] <= expected_e2e + 50, latency["e2e"]
    assert result["tokens"]["output"] == 8 * FAKE_TOKENS and result["tokens"]["input"] > 0
    assert result["prefix_cache_hit_rate"] == 0.0  # the fake caches nothing (and reports so)


@pytest.mark.parametrize("backend", ["openai-chat", "openai-completions", "sglang"])
def test_each_turn_of_a_conversation_carries_the_previous_turns(fake_url, backend):
    workload = MultiTurnWorkload(conversations=1, turns=3, system_len=10, input_len=LengthRange(5, 5),
                                 output_len=LengthRange(4, 4))
    config = BenchConfig(url=fake_url, workload=workload, load=Load(concurrency=1), backend=backend)
    run = asyncio.run(run_bench(config, progress=False))
    assert [r.error for r in run.results] == [None] * 3, [r.error_detail for r in run.results]
    # The fake counts a prompt's words: each turn adds the last answer (4) and a message (5), less one word
    # where a text prompt joins the message to the answer. Without the history every turn would be alike.
    prompts = [r.prompt_tokens for r in run.results]
    assert all(later - earlier >= 5 + 4 - 1 for earlier, later in zip(prompts, prompts[1:])), prompts


def test_the_workload_flags_are_the_workloads_settings():
    assert set(WORKLOAD_FLAGS) == {name for workload in WORKLOADS.values() for name in settings_of(workload)}


def test_without_streaming_only_end_to_end_latency_is_measured(fake_url):
    result = _bench(fake_url, _fake_workload(4), stream=False)
    _assert_all_completed(result, 4)
    assert result["latency_ms"]["ttft"] is None and result["latency_ms"]["itl"] is None
    assert result["latency_ms"]["e2e"]["count"] == 4 and result["tokens"]["output"] == 4 * FAKE_TOKENS


def test_open_loop_keeps_at_most_max_concurrency_requests_in_flight(fake_url):
    result = _bench(fake_url, _fake_workload(6), Load(request_rate=float("inf"), max_concurrency=2))
    _assert_all_completed(result, 6)
    one = (FAKE_TTFT + (FAKE_TOKENS - 1) * FAKE_ITL)
    assert result["duration_s"] >= 3 * one  # 6 requests, 2 at a time


def test_ctrl_c_stops_the_run_and_still_writes_the_result(fake_url, tmp_path):
    out = tmp_path / "stopped.json"
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw", "bench", "--url", fake_url, "--num-requests", "1000",
                             "--output-len", "5", "--concurrency", "4", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(5)  # start-up, then requests of 0.4 s, 4 at a time (all 1,000 would take 100 s)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    result = json.loads(out.read_text())
    assert result["interrupted"] and "(interrupted)" in stdout
    requests = result["requests"]
    assert 0 < requests["completed"] and requests["sent"] < 1000


def _cli_error(capsys, *args: str) -> str:
    parsed = build_parser().parse_args(["bench", *args])
    with pytest.raises(SystemExit) as exited:
        parsed.func(parsed)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args, flag", [
    (["--turns", "3"], "--turns"),                      # random has no turns
    (["--workload", "multi-turn", "--num-requests", "5"], "--num-requests"),
    (["--max-concurrency", "4"], "--max-concurrency"),   # only with --request-rate
    (["--compare", "only-one.json"], "--compare"),
    (["--output", "/nonexistent/dir/out.json"], "--output"),
])
def test_bad_flags_are_refused_naming_the_flag(capsys, args, flag):
    assert flag in _cli_error(capsys, *args)


@pytest.mark.parametrize("args, flag", [
    (["--input-len", "9:3"], "--input-len"), (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "2", "--request-rate", "5"], "--request-rate"),
])
def test_bad_values_are_refused_by_argparse_naming_the_flag(capsys, args, flag):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", *args])
    assert exited.value.code == 2 and flag in capsys.readouterr().err


def test_an_unreachable_server_counts_every_request_as_a_connect_error(tmp_path):
    out = tmp_path / "down.json"
    done = _run_cli("--url", f"http://127.0.0.1:{free_port()}", "--backend", "openai-chat", "--model", "m",
                    "--num-requests", "3", "--output", str(out))
    assert done.returncode == 1, done.stderr
    result = json.loads(out.read_text())
    assert result["requests"]["sent"] == 3 and result["errors"] == {"connect": 3}, result


# ---- against a real `serve` (one tiny engine) ------------------------------------------------------


@pytest.fixture(scope="module")
def serve(tiny_models, tmp_path_factory):
    server = ServeProcess({"engines": [{"model": str(tiny_models["llama"]), "served_model_name": "tiny", "count": 1,
                                        "base_port": free_port(), "max_total_tokens": 20000,
                                        "num_threads": 1}]}, tmp_path_factory.mktemp("bench-serve"))
    try:
        server.wait_all_ready()
        wait_http(server.url + "/ready", server.proc)
        yield server
    finally:
        server.stop()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_gw", "bench", *args], capture_output=True, text=True,
                          timeout=120)


def _bench_serve(serve: ServeProcess, tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    done = _run_cli("--url", serve.url, "--output", str(out), "--label", name, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert set(result) == RESULT_FIELDS
    assert result["requests"]["errors"] == 0, result["error_examples"]
    return result


def test_every_workload_against_serve(serve, tmp_path):
    random_run = _bench_serve(serve, tmp_path, "random", "--workload", "random", "--num-requests", "8",
                              "--input-len", "20:40", "--output-len", "4", "--concurrency", "4", "--seed", "1",
                              "--png", str(tmp_path / "random.png"))
    _assert_all_completed(random_run, 8)
    assert random_run["backend"] == "openai-chat" and random_run["model"] == "tiny"
    assert random_run["tokens"]["output"] == 8 * 4 and random_run["tokens"]["input"] > 8 * 20
    assert random_run["prefix_cache_hit_rate"] < 0.1
    assert (tmp_path / "random.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shared = _bench_serve(serve, tmp_path, "shared", "--workload", "shared-prefix", "--groups", "2",
                          "--group-size", "6", "--system-len", "60", "--input-len", "4:8", "--output-len", "4",
                          "--concurrency", "2", "--seed", "2")
    _assert_all_completed(shared, 12)
    assert shared["prefix_cache_hit_rate"] > 0.5

    chat = _bench_serve(serve, tmp_path, "chat", "--workload", "multi-turn", "--conversations", "3", "--turns", "3",
                        "--system-len", "20", "--input-len", "4:8", "--output-len", "4:6", "--think-time", "0.05",
                        "--concurrency", "3", "--seed", "3")
    _assert_all_completed(chat, 9)
    assert chat["prefix_cache_hit_rate"] > 0.3  # turns 2 and 3 find the previous turn cached

    structured = _bench_serve(serve, tmp_path, "structured", "--workload", "structured", "--num-requests", "4",
                              "--input-len", "4", "--output-len", "24", "--request-rate", "20", "--seed", "4")
    _assert_all_completed(structured, 4)

    compared = _run_cli("--compare", str(tmp_path / "random.json"), str(tmp_path / "shared.json"))
    assert compared.returncode == 0, compared.stderr
    assert "shared / random" in compared.stdout
    hit_row = next(line for line in compared.stdout.splitlines() if line.startswith("cache hit rate"))
    assert hit_row.split()[-2].endswith("x")  # the ratio column


@pytest.mark.parametrize("backend", ["openai-completions", "sglang"])
def test_text_apis_report_cached_tokens_against_serve(serve, tmp_path, backend):
    result = _bench_serve(serve, tmp_path, backend, "--backend", backend, "--workload", "shared-prefix",
                          "--groups", "1", "--group-size", "4", "--system-len", "60", "--input-len", "4",
                          "--output-len", "4", "--concurrency", "1", "--seed", "5" if backend == "sglang" else "6")
    _assert_all_completed(result, 4)
    assert result["backend"] == backend and result["prefix_cache_hit_rate"] > 0.5
    assert result["latency_ms"]["ttft"]["count"] == 4
