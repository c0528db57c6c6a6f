"""Gateway fault handling against fault-injecting fake engines (the one place a fake belongs)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time

import aiohttp
import pytest
from aiohttp import web

from sglang_gw.gateway.app import Gateway
from sglang_gw.gateway.auth import hash_key
from sglang_gw.gateway.config import parse_config
from sglang_gw.resume import RESUMABLE_HEADER, RESUME_FIELD, annotation

MODEL = "fake"
RECEIVED = web.AppKey("received", list)  # a fake engine's request bodies
ADMIN_KEY = "sk-gw-admin-for-tests"


def fake_engine(mode: str) -> web.Application:
    """ok: answers; error503/error500: fails every generation; midstream: drops the connection after two
    SSE events; midjson: drops it halfway through a JSON answer; stall: stops sending after two events,
    connection open; hang: never answers /health; slowhealth: answers /health after 1.5 s (past the
    probe timeout) and everything else at once; stuck: its /health heartbeat says the scheduler has had
    work and no finished step for 999 s; slow: answers after 0.5 s; other: serves the model "other-model";
    resumable: streams token ids 1, 2, 3, ... annotated as our engine does when the gateway asks
    (sglang_gw/resume.py), continuing after the ids of a resumed request, and dies after two events;
    gzip: compresses its JSON answers whatever the request accepts, with headers of its own; linger:
    waits 0.5 s after its stream's [DONE] before ending it; healthz: answers probes on /healthz only (its
    worker is configured with that health_path). A "-suffix" only names another worker of the same kind. Every request body is kept in `received`."""
    mode = mode.split("-")[0]
    received: list[dict] = []

    async def health(request):
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "slowhealth":
            await asyncio.sleep(1.5)
        if mode == "stuck":
            return web.json_response({"status": "ok", "steps": 7, "busy": True, "since_progress_s": 999.0})
        return web.json_response({"status": "ok"})

    async def models(request):
        model = "other-model" if mode == "other" else MODEL
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def completions(request):
        body = await request.json()
        received.append(body)
        if mode == "resumable":
            return await resumable(request, body)
        if mode in ("error503", "error500"):
            status = int(mode[-3:])
            return web.json_response({"error": {"message": mode, "type": "x", "param": None, "code": None}},
                                     status=status)
        if mode == "slow":
            await asyncio.sleep(0.5)
        if mode == "gzip" and not body.get("stream"):
            answer = json.dumps({"choices": [{"index": 0, "text": "from gzip"}]}).encode()
            return web.Response(body=gzip.compress(answer), headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip", "Cache-Control": "no-store",
                "x-engine-note": "kept"})
        if mode == "midjson":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"id": "c", "object": "text_completion", "choices": [{"index": 0, "te')
            request.transport.close()  # the engine dies mid-answer
            return resp
        if not body.get("stream"):
            return web.json_response({"id": "c", "object": "text_completion", "model": MODEL,
                                      "choices": [{"index": 0, "text": f"from {mode}", "finish_reason": "length"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(2):
            await resp.write(b'data: {"choices": [{"index": 0, "text": "t"}]}\n\n')
        if mode == "midstream":
            request.transport.close()  # the engine dies mid-response
            return resp
        if mode == "stall":
            await asyncio.sleep(3600)  # hung mid-stream: the connection stays open, no more bytes
        await resp.write(b"data: [DONE]\n\n")
        if mode == "linger":
            await asyncio.sleep(0.5)
        return resp

    async def resumable(request, body):
        annotate = RESUMABLE_HEADER in request.headers
        had = body.get(RESUME_FIELD, {}).get("0", [])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ids = list(had)
        for _ in range(2):
            ids.append(len(ids) + 1)
            event = {"id": f"cmpl-{len(received)}", "created": len(received),
                     "choices": [{"index": 0, "text": f"<{ids[-1]}>"}]}
            head = annotation(0, len(ids) - 1, ids[-1:], False) if annotate else b""
            await resp.write(head + b"data: " + json.dumps(event).encode() + b"\n\n")
        request.transport.close()  # dies mid-stream
        return resp

    app = web.Application()
    app[RECEIVED] = received
    app.router.add_get("/healthz" if mode == "healthz" else "/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


class Fleet:
    """Fake engines plus the gateway, all on one event loop in a background thread."""

    def __init__(self, modes: list[str], **config):
        config = {"admin": {"key_hash": hash_key(ADMIN_KEY)}, **config}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners = []
        self.apps = {mode: fake_engine(mode) for mode in modes}
        urls = [self.call(self._serve(app)) for app in self.apps.values()]
        workers = [{"url": u, "name": m, **({"health_path": "/healthz"} if m.startswith("healthz") else {})}
                   for u, m in zip(urls, modes)]
        cfg = parse_config({"port": 0, "workers": workers,
                            "health": {"interval": 0.2, "timeout": 1.0, "failure_threshold": 2, "stall_timeout": 1.0},
                            "retry_backoff": 0.0, "policy": {"name": "round_robin"}, **config})
        self.gateway = Gateway(cfg, seed=0)
        self.url = self.call(self._serve(self.gateway.app))

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _serve(self, app) -> str:
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def close(self):
        async def stop():
            for runner in reversed(self.runners):
                await runner.cleanup()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)

    def states(self) -> dict[str, str]:
        return {w.name: w.health.state.value for w in self.gateway.workers}

    def assert_load_settles(self) -> None:
        """Load is released when the answer is handed over: a stream's just after the client has its last byte."""
        deadline = time.monotonic() + 5
        while any(w.inflight for w in self.gateway.workers):
            assert time.monotonic() < deadline, [(w.name, w.inflight) for w in self.gateway.workers]
            time.sleep(0.01)


async def _post(url: str, body: dict, path: str = "/v1/completions", method: str = "POST",
                key: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, json=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
def fleet(request):
    fleet = Fleet(request.param)
    yield fleet
    fleet.close()


@pytest.mark.parametrize("fleet", [["error503", "ok"], ["error500", "ok"]], indirect=True)
def test_failed_upstream_is_retried_elsewhere(fleet):
    policy_order = []
    for _ in range(6):
        status, headers, body = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))
        policy_order.append(headers["x-sglang-gw-worker"])
        if headers["x-sglang-gw-route"] == "retry":
            assert headers["x-should-retry"] == "false"
        if fleet.gateway.workers[0].name == "error503":
            assert status == 200 and json.loads(body)["choices"][0]["text"] == "from ok"
    if fleet.gateway.workers[0].name == "error500":
        # A 500 is the engine's answer (the request may have run): passed through, never retried.
        assert "error500" in policy_order
    fleet.assert_load_settles()


@pytest.mark.parametrize("fleet", [["midstream", "ok"]], indirect=True)
def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(fleet):
    bodies = [asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x", "stream": True}))[2] for _ in range(4)]
    broken = [b for b in bodies if b"upstream_failed" in b]
    assert broken, bodies
    assert all(b.count(b"data: ") == 3 and b"[DONE]" not in b for b in broken)  # 2 events, then the error
    fleet.assert_load_settles()


def test_stream_continues_on_another_worker_until_the_failovers_run_out():
    """Issue 12: a worker that dies mid-stream is replaced by another that continues from the token ids the
    client has; the client sees one stream (the first worker's id) until max_failovers is spent, then an
    error event. With max_failovers 0 the gateway does not ask for the ids and nothing is continued."""
    def one_stream(max_failovers: int) -> tuple[int, bytes, list[dict]]:
        """A stream through two workers that die after two events: its status, body, and what they were sent."""
        fleet = Fleet(["resumable", "resumable-2"], max_failovers=max_failovers)
        try:
            status, _, body = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x", "stream": True}))
            return status, body, [b for app in fleet.apps.values() for b in app[RECEIVED]]
        finally:
            fleet.close()

    status, body, bodies = one_stream(max_failovers=1)
    events = [json.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: ")]
    assert status == 200 and b": gw" not in body  # the annotations are the gateway's, never the client's
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["<1>", "<2>", "<3>", "<4>"]
    assert len({(e["id"], e["created"]) for e in events[:-1]}) == 1
    assert events[-1]["error"]["code"] == "upstream_failed" and "1 failovers" in events[-1]["error"]["message"]
    assert bodies[0].get(RESUME_FIELD) is None and bodies[1][RESUME_FIELD] == {"0": [1, 2]}

    status, body, bodies = one_stream(max_failovers=0)
    assert len(bodies) == 1 and body.count(b"data: ") == 3 and b"upstream_failed" in body


def test_a_worker_that_cannot_continue_a_stream_is_never_relayed_into_it():
    """A continuation answered without annotations (a server that ignores resume_output_ids and starts
    over) would repeat the client's text: none of it is relayed; the stream ends with an error event."""
    fleet = Fleet(["resumable", "ok"], max_failovers=2)
    try:  # round robin: one of two requests starts on the worker that dies
        answers = [asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x", "stream": True})) for _ in range(2)]
    finally:
        fleet.close()
    status, _, body = next(a for a in answers if a[1]["x-sglang-gw-worker"] == "resumable")
    assert status == 200 and b"upstream_failed" in body
    assert [json.loads(line[6:]).get("choices", [{}])[0].get("text") for line in body.split(b"\n\n")
            if line.startswith(b"data: ")][:-1] == ["<1>", "<2>"] and body.count(b"data: ") == 3 and b"upstream_failed" in body


@pytest.mark.parametrize("fleet", [["healthz"]], indirect=True)
def test_probes_ask_the_workers_health_path(fleet):
    assert fleet.states() == {"healthz": "ready"}
    status, _, body = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))
    assert status == 200 and json.loads(body)["choices"][0]["text"] == "from healthz"


@pytest.mark.parametrize("fleet", [["gzip"]], indirect=True)
def test_answers_are_relayed_decoded_with_the_engines_headers(fleet):
    """An engine that compresses although asked for identity: the client gets the JSON itself, never gzip
    bytes without their Content-Encoding; the engine's own headers a client may use are passed on."""
    async def raw_post():
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.post(fleet.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
                return resp.status, resp.headers, await resp.read()

    status, headers, body = asyncio.run(raw_post())
    assert status == 200 and "Content-Encoding" not in headers
    assert json.loads(body)["choices"][0]["text"] == "from gzip"
    assert headers["x-engine-note"] == "kept" and headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("fleet", [["linger"]], indirect=True)
def test_a_client_leaving_after_done_is_a_normal_ending(fleet):
    """A client that closes its connection once it has [DONE] is counted (request log, latency, the
    disconnect counter), and is no error."""
    def latency_count() -> float:
        return fleet.gateway.metrics.registry.get_sample_value("sglang_gw_request_seconds_count",
                                                               {"path": "/v1/completions"}) or 0.0

    before = latency_count()
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
    host, port = fleet.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"[DONE]" not in received:
            received += conn.recv(65536)
    deadline = time.monotonic() + 5
    while latency_count() == before:
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.05)
    assert fleet.gateway.metrics.registry.get_sample_value("sglang_gw_client_disconnects_total") == 1
    fleet.assert_load_settles()


@pytest.mark.parametrize("fleet", [["midjson", "ok"]], indirect=True)
def test_json_answer_breaking_mid_body_is_retried_and_never_gets_an_sse_frame(fleet):
    answers = [asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"})) for _ in range(4)]
    assert any(headers["x-sglang-gw-route"] == "retry" for _, headers, _ in answers)
    for status, headers, body in answers:
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["choices"][0]["text"] == "from ok"  # a whole JSON answer, from the other worker
    fleet.assert_load_settles()


@pytest.mark.parametrize("fleet", [["midjson"]], indirect=True)
def test_json_answer_breaking_mid_body_on_the_only_worker_is_a_json_error(fleet):
    status, headers, body = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))
    assert status == 502 and headers["x-should-retry"] == "false"
    assert json.loads(body)["error"].keys() == {"message", "type", "param", "code"}
    assert fleet.states()["midjson"] == "unhealthy"
    fleet.assert_load_settles()


def _hung_calls(fleet) -> list[tuple[str, str]]:
    calls = []
    fleet.gateway.on_hung = lambda name, why: calls.append((name, why))
    return calls


def _wait_state(fleet, worker: str, state: str, timeout: float) -> float:
    """Seconds until `worker` is in `state`."""
    started = time.monotonic()
    while fleet.states()[worker] != state:
        assert time.monotonic() - started < timeout, fleet.states()
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("fleet", [["hang", "ok"]], indirect=True)
def test_worker_that_never_answers_its_probe_is_taken_out_but_not_called_hung(fleet):
    hung = _hung_calls(fleet)
    _wait_state(fleet, "hang", "unhealthy", 15)  # a stopped remote worker looks like this
    for _ in range(4):
        status, headers, _ = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))
        assert status == 200 and headers["x-sglang-gw-worker"] == "ok"
    assert hung == []  # a timeout is no evidence of a hang: a busy engine's probes time out too


@pytest.mark.parametrize("fleet", [["stuck", "ok"]], indirect=True)
def test_worker_whose_heartbeat_shows_no_progress_is_hung(fleet):
    hung = _hung_calls(fleet)
    fleet.gateway.workers[0].health.admit()  # as the supervisor does; its first probe found it hung already
    _wait_state(fleet, "stuck", "unhealthy", 5)  # the heartbeat's 999 s are past hang_timeout (60 s)
    assert hung == [("stuck", "scheduler busy with no step for 999.0s")]


@pytest.mark.parametrize("fleet", [["slowhealth"]], indirect=True)
def test_slow_probes_of_a_worker_that_keeps_answering_keep_it_in_rotation(fleet):
    hung = _hung_calls(fleet)
    worker = fleet.gateway.workers[0]
    worker.models = {MODEL}  # its first probe timed out too, before it learned them
    worker.health.admit()
    busy_until = time.monotonic() + 3.0  # 2 probe timeouts (1 s each) and more
    while time.monotonic() < busy_until:  # requests answered all along: the worker is slow to probe, not gone
        status, _, _ = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))
        assert status == 200 and fleet.states()["slowhealth"] == "ready"
    assert worker.health.probe_timeouts >= 2
    out_after = _wait_state(fleet, "slowhealth", "unhealthy", 5)  # quiet: now nothing vouches for it
    assert out_after < 3.0 and hung == []


@pytest.mark.parametrize("fleet", [["ok", "ok-2"]], indirect=True)
def test_refused_connection_ejects_the_worker_and_the_request_succeeds(fleet):
    fleet.gateway.workers[1].url = "http://127.0.0.1:9"  # now refuses connections; probes have not noticed
    fleet.gateway.workers[1].health.admit()
    statuses = [asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"})) for _ in range(2)]
    status, headers, _ = next(s for s in statuses if s[1]["x-sglang-gw-route"] == "retry")
    assert all(s[0] == 200 for s in statuses)
    assert status == 200 and headers["x-sglang-gw-route"] == "retry" and headers["x-should-retry"] == "false"
    assert fleet.states()["ok-2"] == "unhealthy"


@pytest.mark.parametrize("fleet", [["stall", "ok"]], indirect=True)
def test_stalled_stream_makes_the_worker_suspect(fleet):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(fleet.url + "/v1/completions",
                                    json={"model": MODEL, "prompt": "x", "stream": True}) as stuck:
                await stuck.content.readline()  # the first event arrived; then nothing
                deadline = time.monotonic() + 10
                while fleet.states()["stall"] != "unhealthy":
                    assert time.monotonic() < deadline, fleet.states()
                    await asyncio.sleep(0.05)
                status, headers, _ = await _post(fleet.url, {"model": MODEL, "prompt": "y"})
                assert status == 200 and headers["x-sglang-gw-worker"] == "ok"

    # round robin sends the first request to "stall"
    asyncio.run(run())


@pytest.mark.parametrize("fleet", [["ok", "ok-2"]], indirect=True)
def test_admin_api_drains_adds_and_removes_workers(fleet):
    def admin(path, method="POST", body=None, key=ADMIN_KEY):
        status, _, out = asyncio.run(_post(fleet.url, body or {}, path, method, key))
        return status, json.loads(out)

    assert admin("/admin/workers/ok-2/drain", key="sk-gw-wrong")[0] == 401
    assert admin("/admin/workers/ok-2/drain") == (200, {"name": "ok-2", "draining": True, "inflight": 0})
    workers = {asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))[1]["x-sglang-gw-worker"]
               for _ in range(4)}
    assert workers == {"ok"}  # a draining worker gets nothing new
    admin("/admin/workers/ok-2/undrain")
    extra = fleet.call(fleet._serve(fake_engine("ok")))
    assert admin("/admin/workers", body={"url": extra, "name": "ok-3"}) == (201, {"name": "ok-3", "state": "ready"})
    assert admin("/admin/workers", body={"url": extra, "name": "ok-3"})[0] == 409
    assert admin("/admin/workers", body={"url": "not-a-url"})[0] == 400
    workers = {asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))[1]["x-sglang-gw-worker"]
               for _ in range(6)}
    assert workers == {"ok", "ok-2", "ok-3"}
    assert admin("/admin/workers/ok", method="DELETE")[0] == 200
    assert admin("/admin/workers/nope", method="DELETE")[0] == 404
    assert [w.name for w in fleet.gateway.workers] == ["ok-2", "ok-3"]


def test_supervisor_hooks_eject_at_once_and_forget_prefixes():
    fleet = Fleet(["ok", "ok-2"], policy={"name": "prefix_affinity", "block_size": 8})
    try:
        gateway, index = fleet.gateway, fleet.gateway.policy.index
        _, headers, _ = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "a long shared prefix " * 4}))
        home = headers["x-sglang-gw-worker"]
        other = "ok-2" if home == "ok" else "ok"
        assert index.bytes_of(home) > 0
        gateway.worker_exited(home)
        assert fleet.states()[home] == "dead" and index.bytes_of(home) == 0
        for _ in range(3):
            _, headers, _ = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "a long shared prefix " * 4}))
            assert headers["x-sglang-gw-worker"] == other
        gateway.worker_restarted(home)
        assert fleet.states()[home] == "starting"
        deadline = time.monotonic() + 5
        while fleet.states()[home] != "ready":  # the probe re-admits it once it answers
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        fleet.close()


@pytest.mark.parametrize("fleet", [["error500", "ok"]], indirect=True)
def test_circuit_breaker_takes_a_failing_worker_out(fleet):
    seen = [asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))[1]["x-sglang-gw-worker"]
            for _ in range(14)]
    # Round robin alternates until error500 has failed 5 times in a row; then its circuit is open.
    assert seen[:10].count("error500") == 5 and set(seen[10:]) == {"ok"}
    assert fleet.states()["error500"] == "ready"  # its /health is fine: only the breaker keeps it out


def test_half_open_breaker_lets_one_trial_request_through():
    fleet = Fleet(["error500", "ok"], health={"interval": 0.2, "breaker_cooldown": 1.0})
    try:
        def workers_seen(n):
            return [asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))[1]["x-sglang-gw-worker"]
                    for _ in range(n)]

        assert workers_seen(10).count("error500") == 5  # 5 failures in a row: open
        time.sleep(1.1)
        assert workers_seen(6).count("error500") == 1  # half-open: one trial, which fails: open again
        _, _, body = asyncio.run(_post(fleet.url, {}, "/workers", "GET"))
        assert {w["name"]: w["breaker"] for w in json.loads(body)["workers"]} == {"error500": "open", "ok": "closed"}
    finally:
        fleet.close()


def test_requests_wait_in_a_bounded_queue_when_every_worker_is_at_its_cap():
    fleet = Fleet(["slow", "slow-2"], max_inflight_per_worker=1, max_queued_requests=2)
    try:
        async def burst(n):
            return await asyncio.gather(*(_post(fleet.url, {"model": MODEL, "prompt": str(i)}) for i in range(n)))

        assert [status for status, _, _ in asyncio.run(burst(4))] == [200] * 4  # 2 running, 2 queued
        statuses = sorted(status for status, _, _ in asyncio.run(burst(5)))
        assert statuses == [200, 200, 200, 200, 503]
        rejected = next(h for status, h, _ in asyncio.run(burst(5)) if status == 503)
        assert rejected["Retry-After"] == "1"
        fleet.assert_load_settles()
        assert fleet.gateway.queued == 0
    finally:
        fleet.close()


def test_engine_slower_than_the_request_timeout_is_retried_elsewhere():
    fleet = Fleet(["slow", "ok"], request_timeout=0.2)
    try:
        routes = []
        for _ in range(2):  # round robin: one of the two starts on the slow engine
            status, headers, body = asyncio.run(_post(fleet.url, {"model": MODEL, "prompt": "x"}))
            assert status == 200 and json.loads(body)["choices"][0]["text"] == "from ok"
            routes.append(headers["x-sglang-gw-route"])
        assert "retry" in routes
        fleet.assert_load_settles()
    finally:
        fleet.close()


@pytest.mark.parametrize("fleet", [["ok", "other", "other-2"]], indirect=True)
def test_requests_go_only_to_workers_serving_their_model(fleet):
    for model, expected in ((MODEL, {"ok"}), ("other-model", {"other", "other-2"})):
        seen = {asyncio.run(_post(fleet.url, {"model": model, "prompt": "x"}))[1]["x-sglang-gw-worker"]
                for _ in range(6)}
        assert seen == expected, (model, seen)
    status, _, body = asyncio.run(_post(fleet.url, {"model": "missing", "prompt": "x"}))
    assert status == 404 and json.loads(body)["error"]["param"] == "model"
    status, _, body = asyncio.run(_post(fleet.url, {}, "/v1/models", "GET"))
    assert sorted(m["id"] for m in json.loads(body)["data"]) == [MODEL, "other-model"]
