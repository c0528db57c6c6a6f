"""What the supervisor runs: one `EngineSpec` per local engine, and the process that fills it.

A spec is the full command line and environment of one slot: `sglang-gw engine` with the group's
settings, or a command group's template filled in with the slot's port and GPU. The GPU is pinned with
CUDA_VISIBLE_DEVICES; our CPU engines get a share of the cores (torch and OpenMP threads) so that N
engines do not oversubscribe the machine. Engines run in their own session (a Ctrl-C on the terminal
reaches only the supervisor, which stops them in order; the session's process group is everything the
engine started) and die with the supervisor even after kill -9 (`lifeline`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..config import CommandGroupConfig, ServeConfig, local_engine_names
from ..config.schema import HEALTH_PATH
from ..engine.settings import to_flags
from . import lifeline

log = structlog.get_logger(__name__)

LOG_LEVELS = {"debug", "info", "warning", "error", "critical"}


@dataclass(frozen=True)
class EngineSpec:
    name: str  # engine-<index>, numbered across the config's engine groups
    url: str  # where the gateway reaches it
    argv: tuple[str, ...]  # our engine: exactly the group's settings as flags; a command: its filled-in template
    env: tuple[tuple[str, str], ...]  # set on top of the supervisor's environment
    gpu: str | None
    health_path: str  # answers 200 once the engine is ready
    startup_timeout: float | None  # the group's; None: supervisor.startup_timeout


def plan_engines(config: ServeConfig, cores: int | None = None) -> list[EngineSpec]:
    names = local_engine_names(config)
    cores = cores or len(os.sched_getaffinity(0))
    share = max(1, cores // max(1, len(names)))
    specs = []
    for name, g, i in names:
        group = config.engines[g]
        port, gpu = group.base_port + i, group.gpu(i)
        env = {"PYTHONUNBUFFERED": "1", "SGLANG_GW_ENGINE_NAME": name}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if isinstance(group, CommandGroupConfig):
            # Run through the lifeline, which execs the command: it dies with the supervisor as ours do.
            argv = (sys.executable, "-m", lifeline.__name__, *group.argv(port=port, gpu=gpu))
            host, health_path = "127.0.0.1", group.health_path
        else:
            settings = group.engine_args(port=port, num_threads=group.num_threads or share)
            env["OMP_NUM_THREADS"] = str(settings.num_threads)
            argv = (sys.executable, "-m", "sglang_gw", "engine", *to_flags(settings))
            host, health_path = settings.host, HEALTH_PATH
        specs.append(EngineSpec(name, f"http://{loopback(host)}:{port}", argv, tuple(sorted(env.items())), gpu,
                                health_path, group.startup_timeout))
    return specs


def loopback(host: str) -> str:
    """Where this host reaches a server listening on `host` (a wildcard address is reached over loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


async def spawn(spec: EngineSpec) -> asyncio.subprocess.Process:
    env = dict(os.environ, **dict(spec.env), **{lifeline.PARENT_ENV: str(os.getpid())})
    env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
    return await asyncio.create_subprocess_exec(
        *spec.argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20)


def kill_leftovers(pid: int) -> None:
    """SIGKILL what an exited engine left running in its process group (a server's scheduler or worker
    processes), so that they hold neither its port nor GPU memory when it restarts."""
    try:
        os.killpg(pid, signal.SIGKILL)  # the engine led its own session: its pid is the group's id
    except ProcessLookupError:
        pass  # nothing left


def is_stopped(pid: int) -> bool:
    """The process is stopped by a signal (SIGSTOP, SIGTSTP: state T in /proc/PID/stat; a debugger's
    ptrace stop is t, not T): it runs nothing until someone sends SIGCONT. False off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"  # the state follows "(comm)", which may hold ")"


async def relay_logs(name: str, process: asyncio.subprocess.Process) -> None:
    """Re-log the engine's output tagged with its name: its JSON lines keep their fields and level."""
    elog = log.bind(engine=name, pid=process.pid)
    while True:
        try:
            line = await process.stdout.readline()
        except ValueError:  # a line over the 1 MiB limit: skip the rest of it
            line = await process.stdout.read(1 << 20)
        if not line:
            return
        text = line.decode(errors="replace").rstrip()
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict):
            record.pop("timestamp", None)
            level = record.pop("level", "info")
            event = str(record.pop("event", "engine.log"))
            record.pop("engine", None)
            getattr(elog, level if level in LOG_LEVELS else "info")(event, **record)
        elif text:
            elog.info("engine.output", line=text)
