"""The systemd integration: the unit file (checked by `systemd-analyze verify` where available and by
its key directives), the sysusers.d entry, and the sd_notify protocol against real AF_UNIX sockets."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from sglang_gw.supervisor.sd_notify import notify, watchdog_interval

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "sglang-gw.service"


def _directives(text: str) -> dict[str, list[str]]:
    """Service-section directives of a unit file: key -> values in order (comments dropped)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}{key.strip()}", []).append(value.strip())
    return out


def test_unit_key_directives():
    d = _directives(UNIT.read_text())
    svc = lambda key: d.get(f"[Service]{key}", [])  # noqa: E731
    assert svc("Type") == ["notify"]
    assert svc("NotifyAccess") == ["main"]
    assert svc("KillMode") == ["mixed"]
    assert svc("WatchdogSec") == ["60s"]
    assert svc("ExecStart") == ["/opt/sglang-gw/venv/bin/sglang-gw serve /etc/sglang-gw/config.yaml"]
    assert svc("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert svc("Restart") == ["on-failure"]
    assert svc("User") == ["sglang-gw"] and svc("Group") == ["sglang-gw"]
    assert svc("EnvironmentFile") == ["-/etc/sglang-gw/env"]
    assert "SGLANG_GW_CACHE=/var/cache/sglang-gw" in svc("Environment")
    assert svc("CapabilityBoundingSet") == [""]
    assert svc("DevicePolicy") == ["closed"]
    assert "char-nvidia-uvm rw" in svc("DeviceAllow")
    # Both would break CUDA: a private /dev hides /dev/nvidia*, and the JIT needs W+X memory.
    assert svc("PrivateDevices") in ([], ["no"])
    assert svc("MemoryDenyWriteExecute") in ([], ["no"])
    assert d.get("[Install]WantedBy") == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    # verify checks that every Exec*= binary exists; the unit's /opt/sglang-gw/venv does not exist
    # here, so the copy under test starts this environment's `sglang-gw` instead.
    exe = shutil.which("sglang-gw")
    if exe is None:
        pytest.skip("the sglang-gw entry point is not installed")
    exe = os.path.abspath(exe)
    assert os.access("/bin/kill", os.X_OK), "ExecReload= needs /bin/kill"
    text = UNIT.read_text()
    text, n = re.subn(r"(?m)^ExecStart=/opt/sglang-gw/venv/bin/sglang-gw ", f"ExecStart={exe} ", text)
    assert n == 1
    unit = tmp_path / "sglang-gw.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    # Warnings (unknown keys, unparsable values) do not change the exit status: they name the unit.
    problems = [line for line in output.splitlines() if "sglang-gw" in line]
    assert proc.returncode == 0 and not problems, output


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_entry(tmp_path):
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(["systemd-sysusers", "--dry-run", f"--root={tmp_path}",
                           str(SYSTEMD_DIR / "sglang-gw.sysusers.conf")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Creating user 'sglang-gw'" in proc.stdout + proc.stderr


def test_env_example_is_all_comments():
    for line in (SYSTEMD_DIR / "env.example").read_text().splitlines():
        assert not line.strip() or line.startswith("#"), line


# ---- sd_notify ------------------------------------------------------------------------------------

def _receive(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    return sock.recv(4096)


def test_notify_path_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1", "STATUS=x") is True
        assert _receive(server) == b"READY=1\nSTATUS=x"
        assert notify("WATCHDOG=1") is True
        assert _receive(server) == b"WATCHDOG=1"
    assert os.environ["NOTIFY_SOCKET"] == str(path)  # left in place


def test_notify_abstract_socket(monkeypatch):
    name = f"sglang-gw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=x") is True
        assert _receive(server) == b"READY=1\nSTATUS=x"


def test_notify_without_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_error_is_false(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify("READY=1") is False


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("2000000", None, 1.0),
    ("2000000", "self", 1.0),
    ("2000000", "other", None),
    (None, None, None),
    ("garbage", None, None),
    ("0", None, None),
    ("2000000", "garbage", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(key, value)
    assert watchdog_interval() == expected
