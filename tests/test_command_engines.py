"""Command engines (issue 13): a serve config's engine group that runs a server the user already runs,
given as a command line. Here the command is our own engine program started as an external server; the
supervisor fills in its port, waits for its health path, hands it to the gateway (which learns its
model from /v1/models), restarts it after kill -9, and takes it down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai

from conftest import ServeProcess, free_port, process_gone

MODEL = "tiny"


def _chat(url: str):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])


def test_command_engine_serves_and_is_restarted_after_kill9(tiny_models, tmp_path):
    command = [sys.executable, "-m", "sglang_gw.cli", "engine", "--model", str(tiny_models["llama"]),
               "--port", "{port}", "--served-model-name", MODEL, "--num-threads", "1"]
    serve = ServeProcess({
        "gateway": {"health": {"interval": 0.5, "timeout": 2.0, "failure_threshold": 2}},
        "engines": [{"command": command, "base_port": free_port(), "startup_timeout": 120}],
        "supervisor": {"restart_backoff": 0.2, "restart_backoff_max": 1.0},
    }, tmp_path)
    try:
        first = serve.wait_all_ready()["engine-0"]
        # The pid is the command itself: the lifeline that started it exec'd it.
        assert "sglang_gw.cli" in Path(f"/proc/{first['pid']}/cmdline").read_text()
        assert _chat(serve.url).usage.completion_tokens == 3
        assert [w["models"] for w in serve.get("/workers")[1]["workers"]] == [[MODEL]]  # from its /v1/models

        os.kill(first["pid"], signal.SIGKILL)
        back = serve.wait_for(lambda: (lambda e: e if e["phase"] == "ready" and e["pid"] != first["pid"] else None)(
            serve.engines()["engine-0"]), 120, "engine-0 restarted")
        assert back["restarts"] == 1 and "SIGKILL" in back["last_exit"]
        assert _chat(serve.url).usage.completion_tokens == 3
        assert serve.stop() == 0
        assert process_gone(back["pid"])
    finally:
        serve.stop()


def test_lifeline_execs_the_command_and_it_dies_with_its_supervisor():
    """A command that is no program of ours (sleep) still dies when its supervisor is killed with -9."""
    supervisor = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys\n"
        "env = dict(os.environ, SGLANG_GW_SUPERVISOR_PID=str(os.getpid()))\n"
        "child = subprocess.Popen([sys.executable, '-m', 'sglang_gw.supervisor.lifeline', 'sleep', '600'], env=env)\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")], stdout=subprocess.PIPE, text=True)
    pid = int(supervisor.stdout.readline())
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").read_text() != "sleep\x00600\x00" and time.monotonic() < deadline:
            time.sleep(0.02)  # until the exec
        assert Path(f"/proc/{pid}/cmdline").read_text() == "sleep\x00600\x00"
        supervisor.kill()
        supervisor.wait()
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_gone(pid)
    finally:
        supervisor.kill()
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
