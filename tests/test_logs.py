"""The JSON log sink (sglang_gw/logs.py): lines one event-loop iteration logs reach stderr in one write at
its end; lines from outside a loop, or from a thread, go out at once; every line is one JSON object."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import structlog

from sglang_gw.logs import TickBufferedStderr, configure_logging


class Recorder:
    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def flush(self) -> None:
        pass


def lines(writes: list[bytes]) -> list[dict]:
    text = b"".join(writes).decode()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def restored_structlog():
    yield
    structlog.reset_defaults()


def test_a_loop_iteration_is_one_write_and_other_lines_go_at_once(restored_structlog):
    out = Recorder()
    sink = TickBufferedStderr(out)
    configure_logging("info", "json")
    structlog.configure(logger_factory=lambda *_: sink)  # the JSON setup, into `out` instead of stderr
    log = structlog.get_logger("t")

    log.info("outside", n=0)
    assert len(out.writes) == 1  # no loop: written at once

    async def burst():
        for n in range(3):
            log.info("inside", n=n)
        assert len(out.writes) == 1  # held until the iteration ends
        await asyncio.sleep(0)
        assert len(out.writes) == 2  # then one write for the three

        thread = threading.Thread(target=lambda: log.warning("thread", n=9))
        thread.start()
        thread.join()
        assert len(out.writes) == 3  # a thread's line does not wait for the loop

    asyncio.run(burst())
    log.debug("filtered")  # below the level: nothing
    events = lines(out.writes)
    assert [(e["event"], e["n"], e["level"]) for e in events] == [
        ("outside", 0, "info"), ("inside", 0, "info"), ("inside", 1, "info"), ("inside", 2, "info"),
        ("thread", 9, "warning")]
    assert all(e["timestamp"].endswith("Z") for e in events)
