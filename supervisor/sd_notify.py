"""The sd_notify(3) protocol without libsystemd.

Under the unit's `Type=notify`, systemd waits for "READY=1" before it considers the service started,
shows our "STATUS=..." line in `systemctl status`, expects "WATCHDOG=1" at least every `WatchdogSec`,
and is told "RELOADING=1" / "STOPPING=1" around SIGHUP and SIGTERM. The protocol is one datagram of
newline-separated assignments sent to the AF_UNIX socket named by $NOTIFY_SOCKET, which is small
enough to speak here rather than depend on python-systemd (a C extension that pip cannot build
without the libsystemd headers). Outside systemd every call is a no-op returning False.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


def notify(*lines: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=2/2 engines ready") as one datagram; True if it was sent.

    False when $NOTIFY_SOCKET is unset (not under systemd) or on a socket error (logged). The variable
    is left in place: child processes are spawned with an explicit environment anyway.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed", socket=os.environ.get("NOTIFY_SOCKET"), error=str(exc))
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between "WATCHDOG=1" pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, the value is invalid, or $WATCHDOG_PID names another process.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
