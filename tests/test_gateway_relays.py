"""`gateway.processes` > 1: relay processes share the port and run the request path, one gateway process
keeps the routing state (gateway/relay.py, gateway/relays.py). Real engines where routing is checked; a
slow fake engine where a relay is killed mid-stream (a fault injected at the gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

from conftest import ServeProcess, engine_fleet, process_gone
from sglang_gw.bench import fake_server
from sglang_gw.gateway.auth import hash_key
from sglang_gw.gateway.config import parse_config
from sglang_gw.gateway.relay_link import Link
from sglang_gw.serving import YOUNG_GENERATION
from sglang_gw.testing import free_port, http_json, log_events, stop_process
from sglang_gw.validation import ConfigError

MODEL = "tiny"
KEY, LIMITED = "sk-gw-relay-tests-key", "sk-gw-relay-tests-limited"
ADMIN = "sk-gw-relay-tests-admin"
ONE_AT_A_TIME = [{"name": "one", "hash": hash_key(LIMITED), "max_concurrent": 1}, {"name": "k", "hash": hash_key(KEY)}]


@pytest.fixture(scope="module")
def engines(tiny_models):
    with engine_fleet(3, str(tiny_models["llama"]), "--served-model-name", MODEL) as engines:
        yield engines


@contextlib.contextmanager
def gateway(urls: list[str], tmp_path, log=subprocess.DEVNULL, **config):
    """A `sglang-gw gateway` with two relay processes, its processes' log lines to `log`; yields (URL, its
    process) once every worker is ready."""
    port = free_port()
    config = {"port": port, "processes": 2, "workers": [{"url": u, "name": f"e{i}"} for i, u in enumerate(urls)],
              "health": {"interval": 0.5, "timeout": 1.0}, **config}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw.cli", "gateway", "--config", str(path),
                             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _ready_workers(url) != len(urls):
            assert time.monotonic() < deadline and proc.poll() is None, "gateway did not become ready"
            time.sleep(0.1)
        yield url, proc
    finally:
        stop_process(proc)


def _ready_workers(url: str) -> int | None:
    try:
        return http_json(url + "/ready")[1].get("ready_workers")
    except OSError:
        return None


def relays_of(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def relay_counts(url: str, key: str | None = None) -> dict[str, float]:
    """sglang_gw_relay_requests_total by relay, from /metrics (passed through to the gateway process)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers)).read().decode()
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("sglang_gw_relay_requests_total{")}


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def inflight(url: str) -> int:
    return sum(w["inflight"] for w in http_json(url + "/workers", headers={"Authorization": f"Bearer {KEY}"})[1]["workers"])


def test_processes_config_is_checked():
    assert parse_config({"workers": [{"url": "http://a:1"}], "processes": 4}).processes == 4
    with pytest.raises(ConfigError, match="processes"):
        parse_config({"workers": [{"url": "http://a:1"}], "processes": 0})
    with pytest.raises(ConfigError, match="processes: relay processes share one port"):
        parse_config({"workers": [{"url": "http://a:1"}], "processes": 2, "port": 0})


def test_a_relay_routes_chats_on_the_templates_it_is_told_of_and_sends_their_chain(tiny_models):
    """The settings' chat templates are loaded (in a thread) before the relay serves, so its routing text is
    the rendered template, and what it sends the gateway process is that text's block chain."""
    import asyncio

    from sglang_gw.gateway.config import GatewaySettings
    from sglang_gw.gateway.policies import RouteRequest
    from sglang_gw.gateway.prefix_index import block_chain
    from sglang_gw.gateway.relay import Relay
    from sglang_gw.gateway.routing_text import RoutingText

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    local = RoutingText()
    local.add_template("tiny", str(tiny_models["llama"]))
    rendered = local("/v1/chat/completions", body)
    assert rendered != RoutingText()("/v1/chat/completions", body)  # the template, not role-tagged text

    class Link:
        async def ask(self, message):
            self.asked = message
            return {}  # no worker left

    async def route() -> tuple[str, dict]:
        relay = Relay("/nonexistent")
        relay.link = Link()
        relay.apply({"t": "settings", "c": GatewaySettings().model_dump(mode="json"), "admitting": True,
                     "block": 16, "tpl": {"tiny": str(tiny_models["llama"])}})
        await relay.templates_loaded()
        text = relay.routing_text("/v1/chat/completions", body)
        await relay._choose("tiny", relay._admit(None, "tiny"), set(), RouteRequest(text))
        return text, relay.link.asked

    text, asked = asyncio.run(route())
    assert text == rendered
    assert asked["bl"] == [16, block_chain(rendered.encode(), 16), len(rendered.encode())] and "x" not in asked


def test_relays_route_on_one_shared_state(engines, tmp_path):
    """Sessions and prefixes stick to one engine whichever relay takes the connection (each request on a
    new connection, so the kernel spreads them over both), and the other paths are the gateway process's."""
    with gateway([e.url for e in engines], tmp_path, policy={"name": "prefix_affinity", "block_size": 32},
                 auth={"keys": [{"name": "k", "hash": hash_key(KEY)}]}) as (url, proc):
        assert len(relays_of(proc)) == 2
        placed: dict[str, set[str]] = {}
        for turn in range(6):
            for session in ("s1", "s2", "s3"):
                client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                                       default_headers={"x-session-id": session})
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, max_tokens=2, messages=[{"role": "user", "content": f"turn {turn} of {session}"}])
                assert raw.parse().choices[0].message.content is not None
                placed.setdefault(session, set()).add(raw.headers["x-sglang-gw-worker"])
                client.close()
        assert all(len(workers) == 1 for workers in placed.values()), placed
        shared = "a long system prompt that every tenant request begins with, " * 8
        prefix_workers = set()
        for i in range(8):
            status, body, headers = _post(url, {"model": MODEL, "prompt": shared + str(i), "max_tokens": 1}, KEY)
            assert status == 200, body
            prefix_workers.add(headers["x-sglang-gw-worker"])
        assert len(prefix_workers) == 1  # after the first, every one matched the prefix the first placed
        counts = relay_counts(url)
        assert set(counts) == {"0", "1"} and all(n > 0 for n in counts.values()), counts
        assert sum(counts.values()) == 18 + 8

        # The other paths, passed through: the gateway process's answers, errors and auth.
        status, models = http_json(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]
        status, body, _ = _post(url, {"model": MODEL, "prompt": "hi"}, "sk-gw-wrong")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"  # the relay's own check
        status, body = http_json(url + "/workers")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"  # the gateway process's
        status, body = http_json(url + "/no/such/path")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body, _ = _post(url, {"model": "nope", "prompt": "hi"}, KEY)
        assert status == 404 and body["error"]["param"] == "model"  # refused by the gateway process's choice


def test_key_limits_hold_across_relays(engines, tmp_path):
    keys = [{"name": "rpm", "hash": hash_key(KEY), "rpm": 5}]
    with gateway([e.url for e in engines], tmp_path, auth={"keys": keys}) as (url, proc):
        statuses = [_post(url, {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 1}, KEY)[0] for i in range(12)]
        assert statuses == [200] * 5 + [429] * 7  # one window for the key, whichever relay served each
        assert set(relay_counts(url)) == {"0", "1"}


def test_the_gateway_process_and_each_relay_freeze_their_start_up_heap(tmp_path):
    """Each process that serves settles its heap once it listens (sglang_gw/serving.py): what start-up built
    is frozen out of garbage collection and the young generation is raised, in the gateway process and in
    each relay, the ones that run the request path."""
    fake, fake_url = fake_server.spawn()
    log = tmp_path / "gateway.log"
    try:
        with open(log, "wb") as out, gateway([fake_url], tmp_path, log=out) as (url, proc):
            pids = {proc.pid, *relays_of(proc)}
            deadline = time.monotonic() + 20
            while len(settled := [e for e in log_events(log.read_text()) if e["event"] == "process.heap_settled"]) < 3:
                assert time.monotonic() < deadline, settled
                time.sleep(0.1)
            status, body, _ = _post(url, {"model": "fake", "prompt": "hi", "max_tokens": 1}, KEY)
            assert status == 200, body
        assert len(pids) == 3 and len(settled) == 3, settled
        # The start-up heap is tens of thousands of objects (modules, config, templates): frozen, not walked.
        assert all(e["frozen_objects"] > 10_000 and e["young_generation"] == YOUNG_GENERATION for e in settled)
    finally:
        stop_process(fake)


def test_a_dead_relay_releases_its_leases_and_is_started_again(tmp_path):
    fake, fake_url = fake_server.spawn(itl=0.05)
    keys = ONE_AT_A_TIME
    try:
        with gateway([fake_url], tmp_path, auth={"keys": keys}) as (url, proc):
            before = relays_of(proc)
            stream = _stream_in_flight(url, LIMITED, 200)
            status, body, _ = _post(url, {"model": "fake", "prompt": "hi", "max_tokens": 1}, LIMITED)
            assert status == 429 and body["error"]["code"] == "concurrency_limit_exceeded"
            for pid in before:  # whichever relay holds the stream
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while len(after := relays_of(proc)) != 2 or set(after) & set(before) or _ready_workers(url) != 1:
                assert time.monotonic() < deadline, "the relays were not started again"
                time.sleep(0.1)
            assert inflight(url) == 0  # the dead relay's lease went with it
            status, body, _ = _post(url, {"model": "fake", "prompt": "hi", "max_tokens": 1}, LIMITED)
            assert status == 200, body  # and so did its admission under the key's concurrency limit
            stream.join(timeout=10)
    finally:
        stop_process(fake)


def test_shutdown_lets_a_relayed_stream_finish(tmp_path):
    fake, fake_url = fake_server.spawn(itl=0.02)
    try:
        with gateway([fake_url], tmp_path) as (url, proc):
            relays = relays_of(proc)
            request = urllib.request.Request(url + "/v1/completions", json.dumps(
                {"model": "fake", "prompt": "hi", "max_tokens": 60, "stream": True}).encode(),
                {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                first = answer.readline()
                proc.send_signal(signal.SIGTERM)
                rest = answer.read()
            assert first.startswith(b"data: {") and rest.rstrip().endswith(b"data: [DONE]")
            assert proc.wait(timeout=30) == 0
            assert all(process_gone(pid) for pid in relays)
    finally:
        stop_process(fake)


def _stream_in_flight(url: str, key: str, tokens: int) -> threading.Thread:
    """A stream of `tokens` from the slow fake engine, read in a thread; returns once the gateway counts it."""
    def read() -> None:
        with contextlib.suppress(http.client.HTTPException, OSError):  # a test may kill its relay
            _post(url, {"model": "fake", "prompt": "hi", "max_tokens": tokens, "stream": True}, key)

    stream = threading.Thread(target=read, daemon=True)
    stream.start()
    deadline = time.monotonic() + 10
    while inflight(url) != 1:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.05)
    return stream


def _post(url: str, body: dict, key: str) -> tuple[int, dict | bytes, dict]:
    """POST on a new connection: (status, JSON body or the raw stream, headers)."""
    request = urllib.request.Request(url + ("/v1/completions" if "prompt" in body else "/v1/chat/completions"),
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            data = answer.read()
            return answer.status, data if body.get("stream") else json.loads(data), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_serve_with_relays_takes_a_reload_and_stops(tiny_models, tmp_path):
    """Under `serve`: the relays answer with the engines the supervisor starts, a reload's new key reaches
    them (they check keys themselves), and SIGTERM stops the whole tree."""
    config = {"gateway": {"processes": 2, "health": {"interval": 0.5, "timeout": 1.0},
                          "auth": {"keys": [{"name": "k", "hash": hash_key(KEY)}]}},
              "engines": [{"model": str(tiny_models["llama"]), "served_model_name": MODEL, "count": 1,
                           "base_port": free_port()}]}
    serve = ServeProcess(config, tmp_path, key=KEY)
    try:
        serve.wait_all_ready()
        relays = relays_of(serve.proc)
        relays = [pid for pid in relays if "sglang_gw.gateway.relay" in open(f"/proc/{pid}/cmdline").read()]
        assert len(relays) == 2
        assert _post(serve.url, {"model": MODEL, "prompt": "hi", "max_tokens": 2}, KEY)[0] == 200
        assert _post(serve.url, {"model": MODEL, "prompt": "hi", "max_tokens": 2}, ADMIN)[0] == 401
        config["gateway"]["auth"]["keys"].append({"name": "new", "hash": hash_key(ADMIN)})
        serve.reload(config)
        # Every relay has the new key: each request on a new connection, so both relays are asked.
        before = relay_counts(serve.url, KEY)
        statuses = [_post(serve.url, {"model": MODEL, "prompt": f"hi {i}", "max_tokens": 1}, ADMIN)[0]
                    for i in range(12)]
        assert statuses == [200] * 12
        after = relay_counts(serve.url, KEY)
        assert all(after[relay] > before.get(relay, 0) for relay in ("0", "1")), (before, after)
        assert serve.stop() == 0
        assert all(process_gone(pid) for pid in relays)
    finally:
        serve.stop()


def test_a_request_that_leaves_while_queued_holds_no_lease(tmp_path):
    """The choice a relay asked for comes back after its client left (it waited for a worker below its cap):
    the relay gives the lease straight back, and the key's admission ends with the request."""
    fake, fake_url = fake_server.spawn(itl=0.02)
    keys = ONE_AT_A_TIME
    try:
        with gateway([fake_url], tmp_path, auth={"keys": keys}, max_inflight_per_worker=1) as (url, proc):
            busy = _stream_in_flight(url, KEY, 100)
            with pytest.raises(TimeoutError):  # queued behind the stream, then given up by its client
                urllib.request.urlopen(urllib.request.Request(
                    url + "/v1/completions", json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 1}).encode(),
                    {"Content-Type": "application/json", "Authorization": f"Bearer {LIMITED}"}), timeout=0.5)
            deadline = time.monotonic() + 1.0  # well before the stream ends: the queue lets it go at once
            while metric(url, "sglang_gw_queued_requests") != 0:
                assert time.monotonic() < deadline and busy.is_alive(), "the request kept its place in the queue"
                time.sleep(0.05)
            busy.join(timeout=30)
            deadline = time.monotonic() + 10
            while inflight(url) != 0:
                assert time.monotonic() < deadline, "a lease outlived its request"
                time.sleep(0.05)
            statuses = [_post(url, {"model": "fake", "prompt": "hi", "max_tokens": 1}, LIMITED)[0] for _ in range(4)]
            assert statuses == [200] * 4  # the key's one slot is free again
    finally:
        stop_process(fake)


def test_relays_that_cannot_listen_stop_the_gateway(tmp_path):
    """The port taken by another program: the gateway exits at once, naming the relays, instead of
    restarting them forever."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump({"port": taken.getsockname()[1], "processes": 2,
                                        "workers": [{"url": f"http://127.0.0.1:{free_port()}"}]}))
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "sglang_gw.cli", "gateway", "--config", str(path),
                                 "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "gateway.processes" in result.stderr and "before listening" in result.stderr
    assert "Address already in use" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 30


def test_the_link_sends_an_iterations_messages_as_one_frame_and_a_bad_message_fails_its_sender_alone():
    """relay_link.Link: what one loop iteration sends arrives in order, from one write; a message that cannot
    be encoded raises where it is sent and costs the others nothing; a frame cut across reads is reassembled."""
    class Recording(Link):
        def __init__(self):
            super().__init__()
            self.messages: list[dict] = []
            self.reads = 0

        def received(self, message: dict) -> None:
            self.messages.append(message)

        def data_received(self, data: bytes) -> None:
            self.reads += 1
            for i in range(0, len(data), 7):  # as if the socket gave it 7 bytes at a time
                super().data_received(data[i:i + 7])

    async def run() -> tuple[list[dict], int]:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        _, sender = await loop.create_unix_connection(Link, sock=left)
        _, receiver = await loop.create_unix_connection(Recording, sock=right)
        sender.send({"t": "release", "l": 1})
        with pytest.raises(TypeError):
            sender.send({"t": "ev", "l": 1, "e": "response", "v": {1, 2}})  # a set: no JSON for it
        sender.send({"t": "end", "a": 2, "text": "é\n\"x\""})
        deadline = loop.time() + 5
        while len(receiver.messages) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        sender.transport.close()
        receiver.transport.close()
        return receiver.messages, receiver.reads

    messages, reads = asyncio.run(run())
    assert messages == [{"t": "release", "l": 1}, {"t": "end", "a": 2, "text": "é\n\"x\""}]
    assert reads == 1  # one frame, in one write
