"""Engines die with their supervisor, even when it is killed with SIGKILL and cannot clean up.

The supervisor puts its pid in the engine's environment; the engine, first thing at start, asks the
kernel for SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG) and then checks that the parent is
still the supervisor, which covers a supervisor that died before the request was made.
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
