"""A worker's health on its own: the state machine and the circuit breaker, event by event, on a fake clock.
Busy is not hung (issue 12): timed-out probes and stalls take a worker out at most; a stuck heartbeat, a
stopped process, or silence (probes timing out and nothing heard for hang_timeout) makes it hung."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from sglang_gw.gateway.config import HealthConfig, parse_config
from sglang_gw.gateway.health import Breaker, State, WorkerHealth

SETTINGS = HealthConfig(failure_threshold=2, success_threshold=2, breaker_threshold=3, breaker_cooldown=10,
                        stall_timeout=5, hang_timeout=20, interval=5, timeout=2)
QUIET = "wait:8"  # longer than timeout: nothing heard from the worker since before the next probe was sent

EVENTS = {
    "ok": WorkerHealth.probe_ok,
    "fail": WorkerHealth.probe_failed,
    "timeout": WorkerHealth.probe_timed_out,
    "stopped": lambda h: h.process_checked(True),
    "running": lambda h: h.process_checked(False),
    "admit": WorkerHealth.admit,
    "refused": lambda h: h.connect_error("connect: ClientConnectorError"),
    "broken": lambda h: h.stream_failed("stream: ClientPayloadError"),
    "200": lambda h: h.response(200),
    "400": lambda h: h.response(400),
    "500": lambda h: h.response(500),
    "progress": WorkerHealth.progress,
    "exited": WorkerHealth.exited,
    "restarted": WorkerHealth.restarted,
    "drain": lambda h: h.drain(True),
    "undrain": lambda h: h.drain(False),
}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replay(events: str) -> tuple[WorkerHealth, list[str]]:
    """Events by name; `wait:S` moves the clock, `watch:N` is the stall watchdog with N requests in flight,
    `start`/`end` a request routed to the worker and its end (without a verdict), `ok:S` a probe answered
    200 with a heartbeat of S seconds without a finished step."""
    clock, hung, requests = Clock(), [], []
    health = WorkerHealth("w", SETTINGS, on_hung=lambda name, why: hung.append(why), clock=clock)
    for event in events.split():
        name, _, arg = event.partition(":")
        if name == "wait":
            clock.now += float(arg)
        elif name == "watch":
            health.check_stall(int(arg))
        elif name == "start":
            requests.append(health.request_started())
        elif name == "end":
            health.request_ended(requests.pop())
        elif name == "ok" and arg:
            health.probe_ok(float(arg))
        else:
            EVENTS[name](health)
    return health, hung


OPEN = "admit 500 500 500"  # breaker_threshold failures in a row
HALF_OPEN = OPEN + " wait:10"

TRANSITIONS = [
    # (events, state, breaker, routable, on_hung calls)
    ("", "starting", "closed", False, 0),
    # probes: thresholds, in a row
    ("fail", "unhealthy", "closed", False, 0),  # a starting worker never served: not hung
    ("ok", "starting", "closed", False, 0),
    ("ok ok", "ready", "closed", True, 0),
    ("fail ok ok", "ready", "closed", True, 0),
    ("ok ok fail", "ready", "closed", True, 0),
    ("ok ok fail ok fail", "ready", "closed", True, 0),
    ("ok ok fail fail", "unhealthy", "closed", False, 1),
    ("ok ok fail fail fail fail", "unhealthy", "closed", False, 1),  # once per ready → unhealthy
    ("ok ok fail fail ok ok", "ready", "closed", True, 1),
    ("fail admit", "ready", "closed", True, 0),  # the supervisor's word: at once
    # passive ejection: out at once, back by probes
    ("admit refused", "unhealthy", "closed", False, 0),
    ("admit broken", "unhealthy", "closed", False, 0),
    ("admit refused ok", "unhealthy", "closed", False, 0),
    ("admit refused ok ok", "ready", "closed", True, 0),
    # the breaker: closed → open → half-open → closed or open again
    ("admit 500 500", "ready", "closed", True, 0),
    ("admit 500 500 400 500", "ready", "closed", True, 0),  # an answer below 500 breaks the run
    (OPEN, "ready", "open", False, 0),  # /health may be fine: the breaker alone keeps it out
    ("admit refused refused refused ok ok", "ready", "open", False, 0),
    (OPEN + " wait:9", "ready", "open", False, 0),
    (OPEN + " wait:5 500 wait:5", "ready", "half_open", True, 0),  # late failures do not extend the cooldown
    (HALF_OPEN, "ready", "half_open", True, 0),
    (HALF_OPEN + " start", "ready", "half_open", False, 0),  # one trial at a time
    (HALF_OPEN + " start end", "ready", "half_open", True, 0),  # a trial without a verdict frees the turn
    (HALF_OPEN + " start 200", "ready", "closed", True, 0),
    (HALF_OPEN + " start 500", "ready", "open", False, 0),
    (HALF_OPEN + " start refused", "unhealthy", "open", False, 0),
    (HALF_OPEN + " start 500 wait:10", "ready", "half_open", True, 0),
    # drain: an operator's hold that probes leave alone
    ("admit drain", "ready", "closed", False, 0),
    ("admit drain fail fail ok ok", "ready", "closed", False, 1),
    ("admit drain undrain", "ready", "closed", True, 0),
    # exit and restart
    ("admit exited", "dead", "closed", False, 0),
    ("admit exited ok ok admit refused wait:6 watch:1", "dead", "closed", False, 0),  # only a restart leaves dead
    ("admit exited restarted", "starting", "closed", False, 0),
    ("admit exited restarted ok ok", "ready", "closed", True, 0),
    (OPEN + " exited restarted admit", "ready", "closed", True, 0),  # a new process, a new breaker
    # the stall watchdog: out until the stall ends, never hung by itself (an answer not streamed sends no byte)
    ("admit wait:6 watch:1", "unhealthy", "closed", False, 0),
    ("admit wait:6 watch:0", "ready", "closed", True, 0),  # idle is no stall
    ("admit wait:4 watch:1", "ready", "closed", True, 0),
    ("admit wait:4 progress wait:4 watch:1", "ready", "closed", True, 0),
    ("admit wait:6 start watch:1", "ready", "closed", True, 0),  # a new request restarts the clock
    ("admit wait:6 watch:1 watch:1", "unhealthy", "closed", False, 0),
    ("admit wait:6 watch:1 ok ok", "unhealthy", "closed", False, 0),  # probes wait for the stall to end
    ("admit wait:6 watch:1 ok ok watch:0 ok", "ready", "closed", True, 0),
    ("admit wait:6 watch:1 ok:21", "unhealthy", "closed", False, 1),  # the heartbeat confirms: hung
    # timed-out probes: slow, not hung; out only when nothing was heard from the worker meanwhile
    ("admit timeout timeout", "ready", "closed", True, 0),  # heard from (admitted) after the first unanswered probe was sent
    (f"admit {QUIET} timeout timeout", "unhealthy", "closed", False, 0),
    (f"admit {QUIET} timeout timeout timeout timeout", "unhealthy", "closed", False, 0),  # heard 8 s ago: not hung
    (f"admit {QUIET} timeout progress timeout", "ready", "closed", True, 0),  # a loaded engine relays bytes
    (f"admit {QUIET} timeout 200 timeout", "ready", "closed", True, 0),
    (f"admit {QUIET} timeout ok timeout", "ready", "closed", True, 0),  # in a row
    (f"admit {QUIET} timeout fail", "ready", "closed", True, 0),  # each kind counts its own run
    (f"admit {QUIET} timeout timeout ok", "unhealthy", "closed", False, 0),
    (f"admit {QUIET} timeout timeout ok ok", "ready", "closed", True, 0),
    (f"admit {QUIET} timeout timeout ok:21", "unhealthy", "closed", False, 1),
    # silence: probes time out and nothing at all was heard for hang_timeout (a deadlocked event loop)
    ("admit wait:21 timeout timeout", "unhealthy", "closed", False, 1),
    ("admit wait:21 timeout", "ready", "closed", True, 0),  # one unanswered probe is no silence
    ("admit wait:19 timeout timeout", "unhealthy", "closed", False, 0),
    ("admit wait:15 progress wait:6 timeout timeout", "unhealthy", "closed", False, 0),  # a stream byte 6 s ago
    ("admit wait:15 ok wait:6 timeout timeout", "unhealthy", "closed", False, 0),  # a probe answered 6 s ago
    ("admit wait:21 timeout timeout timeout", "unhealthy", "closed", False, 1),  # once per hang
    # the engine's heartbeat: work but no finished step for hang_timeout is hung, once per hang
    ("admit ok:20", "ready", "closed", True, 0),
    ("admit ok:21", "unhealthy", "closed", False, 1),
    ("admit ok:21 ok:30 ok:40", "unhealthy", "closed", False, 1),
    ("admit ok:21 ok ok", "ready", "closed", True, 1),  # progress again: back by probes
    ("admit ok:21 ok ok ok:21", "unhealthy", "closed", False, 2),  # a new hang
    ("ok:21", "unhealthy", "closed", False, 1),
    ("admit ok:21 exited restarted ok ok", "ready", "closed", True, 1),
    # the supervisor's look at its engine's process: stopped is out at once, hung at failure_threshold looks
    ("admit running", "ready", "closed", True, 0),
    ("admit stopped", "unhealthy", "closed", False, 0),
    ("admit stopped stopped", "unhealthy", "closed", False, 1),
    ("admit stopped stopped stopped", "unhealthy", "closed", False, 1),
    ("admit stopped running stopped", "unhealthy", "closed", False, 0),  # SIGCONT in between: in a row
    ("admit stopped running ok ok", "ready", "closed", True, 0),
    ("admit wait:6 watch:1 stopped stopped", "unhealthy", "closed", False, 1),  # out already: still hung
    ("admit stopped stopped exited restarted running ok ok", "ready", "closed", True, 1),
    ("admit exited stopped stopped ok:21", "dead", "closed", False, 0),
]


@pytest.mark.parametrize("events, state, breaker, routable, hung", TRANSITIONS,
                         ids=[events or "new" for events, *_ in TRANSITIONS])
def test_transitions(events, state, breaker, routable, hung):
    health, hung_calls = replay(events)
    assert (health.state.value, health.breaker.value, health.routable) == (state, breaker, routable)
    assert len(hung_calls) == hung


def test_drain_is_kept_through_probes_exits_and_restarts():
    health, _ = replay("admit drain fail fail exited restarted admit")
    assert health.draining and health.state is State.READY and not health.routable


def test_every_transition_is_logged_once_from_one_place():
    with capture_logs() as logs:
        replay(HALF_OPEN + " start 200 fail fail")
    moves = [(e["event"], e["old"], e["new"]) for e in logs]
    assert moves == [("gateway.worker_state", "starting", "ready"), ("gateway.circuit", "closed", "open"),
                     ("gateway.circuit", "open", "half_open"), ("gateway.circuit", "half_open", "closed"),
                     ("gateway.worker_state", "ready", "unhealthy")]
    assert logs[-1]["why"] == "2 failed probes" and logs[1]["log_level"] == "warning"


def test_a_reload_gives_every_worker_the_new_settings():
    from sglang_gw.gateway.app import Gateway

    raw = {"workers": [{"url": "http://127.0.0.1:9", "name": "a"}, {"url": "http://127.0.0.1:10", "name": "b"}]}
    gateway = Gateway(parse_config(raw))
    gateway.reload(parse_config(dict(raw, health={"failure_threshold": 7, "breaker_cooldown": 3})))
    assert [(w.health.settings.failure_threshold, w.health.settings.breaker_cooldown) for w in gateway.workers] == [
        (7, 3), (7, 3)]


def test_metrics_export_every_state_and_breaker_position():
    from sglang_gw.gateway.app import Gateway

    gateway = Gateway(parse_config({"workers": [{"url": "http://127.0.0.1:9", "name": "a"}]}))
    gateway.worker_exited("a")
    text = gateway.metrics_text().decode()
    for state in State:
        expected = 1.0 if state is State.DEAD else 0.0
        assert f'sglang_gw_worker_state{{state="{state.value}",worker="a"}} {expected}' in text
    for position in Breaker:
        expected = 1.0 if position is Breaker.CLOSED else 0.0
        assert f'sglang_gw_worker_breaker{{state="{position.value}",worker="a"}} {expected}' in text


def test_responses_count_the_gateways_own_refusals_by_status():
    """No engine answers these, so sglang_gw_requests_total never sees them; the error alert reads
    sglang_gw_responses_total, which must."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from sglang_gw.gateway.app import Gateway

    gateway = Gateway(parse_config({"workers": [{"url": "http://127.0.0.1:9", "name": "a"}]}))

    async def go():
        async with TestClient(TestServer(gateway.app)) as client:
            refused = await client.post("/generate", json={"text": "hi"})  # no worker is ready
            malformed = await client.post("/generate", data=b"{")
            return refused.status, malformed.status

    assert asyncio.run(go()) == (503, 400)
    text = gateway.metrics_text().decode()
    assert 'sglang_gw_responses_total{path="/generate",status="503"} 1.0' in text
    assert 'sglang_gw_responses_total{path="/generate",status="400"} 1.0' in text
    assert "sglang_gw_requests_total{" not in text  # no worker answered


def test_a_removed_workers_gauges_go_and_its_counters_stay():
    """An autoscaler sums sglang_gw_inflight_requests over workers: a removed one must not count."""
    from sglang_gw.gateway.app import Gateway

    gateway = Gateway(parse_config({"workers": [{"url": "http://127.0.0.1:9", "name": "a"},
                                                {"url": "http://127.0.0.1:10", "name": "b"}]}))
    gateway.metrics.requests_by["/generate", "200", "a"].inc()
    gateway.queued = 3
    before = gateway.metrics_text().decode()
    assert 'sglang_gw_inflight_requests{worker="a"}' in before and "sglang_gw_queued_requests 3.0" in before
    gateway.remove_worker("a")
    after = gateway.metrics_text().decode()
    left = {line.split("{")[0] for line in after.splitlines() if 'worker="a"' in line}
    assert left == {"sglang_gw_requests_total", "sglang_gw_requests_created"}  # the counter's series only
    assert 'sglang_gw_requests_total{path="/generate",status="200",worker="a"} 1.0' in after
    assert 'sglang_gw_inflight_requests{worker="b"}' in after
