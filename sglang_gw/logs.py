"""Structured logs for every process: JSON lines (or a console rendering on a terminal) on stderr.

The gateway logs every request, so a JSON line must be cheap: orjson renders it, the timestamp is
formatted once a second, and the lines written during one event-loop iteration reach stderr in one
write at its end rather than one write each.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import BinaryIO

import orjson
import structlog


class TickBufferedStderr:
    """structlog's logger for rendered JSON lines (bytes): lines written inside a running event loop are held
    until the end of the loop's current iteration, then written together; lines from anywhere else (a
    thread, start-up, shutdown) flush what is held and go out at once. It is the logger itself rather than
    BytesLogger's file: that adds a lock, a retry wrapper and a flush call per line."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._held: list[bytes] = []
        self._lock = threading.Lock()  # the engine's scheduler thread logs too

    def msg(self, line: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._held.append(line)
            first = len(self._held) == 1
        if loop is None:
            self.drain()
        elif first:
            loop.call_soon(self.drain)

    # structlog calls the method named after the line's level.
    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def drain(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        if held:
            self._out.write(b"\n".join(held) + b"\n")
            self._out.flush()


def _timestamp(_, __, event: dict) -> dict:
    """ISO 8601 UTC with microseconds, like structlog's TimeStamper(fmt="iso"), at a fraction of its cost."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    event["timestamp"] = f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
    return event


_second: list = [None, ""]


configured = ["info", "json"]  # what configure_logging set: a child process (a gateway relay) logs alike


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Once per process. `fmt`: json, console, or auto (console on a terminal)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    configured[:] = [level, fmt]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps, option=orjson.OPT_NON_STR_KEYS)
        sink = TickBufferedStderr(sys.stderr.buffer)
        atexit.register(sink.drain)  # what the last loop iteration held
        factory = lambda *_: sink  # noqa: E731 — every logger is the one sink
    else:
        renderer, factory = structlog.dev.ConsoleRenderer(), structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[structlog.processors.add_log_level, _timestamp, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        # Each logger resolves its processors on first use, not per line.
        cache_logger_on_first_use=True,
    )
