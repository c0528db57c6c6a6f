"""Engines die with their supervisor, even when it is killed with SIGKILL and cannot clean up.

The supervisor puts its pid in the engine's environment; the engine, first thing at start, asks the
kernel for SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG) and then checks that the parent is
still the supervisor, which covers a supervisor that died before the request was made. A command engine
(a server we did not write) is started as `python -m sglang_gw.supervisor.lifeline ARGV...`: this
makes the request and then execs ARGV, which keeps both the pid and the parent-death signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "SGLANG_GW_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return  # not started by a supervisor (a remote engine under its own unit)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):
        os._exit(1)


def exec_command(argv: list[str]) -> None:
    """Become `argv` (same pid), dying with the supervisor; exit 127 when it cannot be run."""
    die_with_supervisor()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"error: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    exec_command(sys.argv[1:])
