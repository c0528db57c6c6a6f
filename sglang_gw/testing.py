"""Helpers shared by the tests and the benchmarks: free ports, waiting for a server, reading SSE lines,
a process's CPU time."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

DONE = "[DONE]"  # what `sse_event` returns for the stream's last line


def free_port() -> int:
    """A free port for a server to bind later: below the ephemeral range, so that no outgoing
    connection takes it meanwhile (a port the kernel hands out for port 0 can be, and was, in CI)."""
    return free_port_range(1)


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports (outgoing connections' local ports) begin."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()  # ports this process returned: two calls never share one


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1, below the ephemeral range: a port there
    stays free until a server binds it (an outgoing connection could take an ephemeral one meanwhile)."""
    top = max(_ephemeral_start(), 20000 + 2 * count) - count
    for _ in range(200):
        base = random.randint(10000, top)
        ports = set(range(base, base + count))
        if ports & _handed_out:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            _handed_out.update(ports)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Until GET url answers 200; fails early when `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def sse_event(line: bytes):
    """The JSON payload of one SSE `data:` line, DONE for `data: [DONE]`, None for any other line."""
    line = line.strip()
    if not line.startswith(b"data: "):
        return None
    payload = line[len(b"data: "):]
    return DONE if payload == DONE.encode() else json.loads(payload)


def http_json(url: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float = 30) -> tuple[int, object]:
    """(status, JSON body) of a GET, or of a POST when `body` is given; error statuses included."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM (a graceful stop), then SIGKILL after `timeout`; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def cpu_seconds(pids: list[int]) -> float:
    """The CPU seconds (user + system) the processes have spent so far, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def log_events(text: str) -> list[dict]:
    """The JSON log lines of a process's output, parsed (other lines skipped): tests look for events by
    their fields, whatever the renderer's spacing."""
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events
