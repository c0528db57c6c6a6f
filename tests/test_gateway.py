"""The gateway in front of real engine processes (tiny model), with the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

from conftest import EngineProcess
from sglang_gw.testing import free_port, http_json
from sglang_gw.gateway.auth import new_key

MODEL = "tiny"


@pytest.fixture(scope="module")
def engines(tiny_models):
    procs = [EngineProcess(str(tiny_models["llama"]), "--served-model-name", MODEL, "--max-total-tokens", "20000")
             for _ in range(3)]
    try:
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


def _start_gateway(engines, tmp_path, **config):
    """A `sglang-gw gateway` process in front of the engines; yields its URL once every engine is ready."""
    port = free_port()
    config = {"port": port, "workers": [{"url": e.url, "name": f"e{i}"} for i, e in enumerate(engines)],
              "health": {"interval": 0.5, "timeout": 1.0}, **config}
    config["workers"] += config.pop("extra_workers", [])
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "sglang_gw.cli", "gateway", "--config", str(path),
                             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while _get_or_none(url + "/ready") != len(engines):
        assert time.monotonic() < deadline and proc.poll() is None, "gateway did not become ready"
        time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get_or_none(url: str) -> int | None:
    try:
        return http_json(url)[1].get("ready_workers")
    except OSError:
        return None


@pytest.fixture(scope="module")
def gateway(engines, tmp_path_factory):
    dead = f"http://127.0.0.1:{free_port()}"  # refuses connections: must stay out of rotation
    yield from _start_gateway(engines, tmp_path_factory.mktemp("gateway"), extra_workers=[{"url": dead, "name": "dead"}],
                              policy={"name": "prefix_affinity", "block_size": 32, "load_margin": 4},
                              max_request_bytes=100_000)


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway + "/v1", api_key="none", max_retries=0)


def _workers(gateway) -> dict[str, dict]:
    return {w["name"]: w for w in http_json(gateway + "/workers")[1]["workers"]}


def test_openai_sdk_through_the_gateway(client, gateway):
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    done = client.completions.create(model=MODEL, prompt="The quick", max_tokens=5, temperature=0)
    assert done.choices[0].text is not None
    assert _workers(gateway)["dead"]["state"] == "unhealthy"


def test_follow_ups_stay_with_the_worker_that_served_the_conversation(client):
    rng = random.Random(0)
    conversations = {c: [{"role": "system", "content": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                                                                for _ in range(60))}] for c in range(6)}
    home = {}
    for turn in range(3):
        for c, messages in conversations.items():
            messages.append({"role": "user", "content": f"question {turn} for tenant {c}"})
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
            out = raw.parse()
            worker, route = raw.headers["x-sglang-gw-worker"], raw.headers["x-sglang-gw-route"]
            if turn == 0:
                home[c] = worker
            else:
                assert (worker, route) == (home[c], "cache_hit")
                # The engine confirms: the whole earlier conversation came from its prefix cache.
                assert out.usage.prompt_tokens_details.cached_tokens > out.usage.prompt_tokens // 2
            messages.append({"role": "assistant", "content": out.choices[0].message.content})
    assert len(set(home.values())) == 3  # six tenants spread over the three engines


def test_load_returns_to_zero_after_completed_failed_and_cancelled_requests(gateway):
    async def run():
        client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="none", max_retries=0)

        async def completed(i):
            await client.completions.create(model=MODEL, prompt=f"ok {i}", max_tokens=4)

        async def failed(i):
            with pytest.raises(openai.BadRequestError):
                await client.completions.create(model=MODEL, prompt=f"bad {i}", max_tokens=4, temperature=-1)

        async def cancelled(i):
            stream = await client.completions.create(model=MODEL, prompt=f"long {i}", max_tokens=500, stream=True,
                                                     extra_body={"ignore_eos": True})
            async for _ in stream:
                break
            await stream.close()

        await asyncio.gather(*(f(i) for i in range(4) for f in (completed, failed, cancelled)))

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while any(w["inflight"] for w in _workers(gateway).values()):
        assert time.monotonic() < deadline, _workers(gateway)
        time.sleep(0.05)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404, "model"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 200_000}).encode(), 413, None),
])
def test_bad_inputs_get_openai_error_bodies(gateway, path, body, status, param):
    got, out = http_json(gateway + path, body)
    assert got == status, out
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["param"] == param


# ---- API keys ---------------------------------------------------------------------------------------

KEYS = {name: new_key() for name in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def keyed_gateway(engines, tmp_path_factory):
    keys = [{"name": "alice", "hash": KEYS["alice"][1], "rpm": 3},
            {"name": "bob", "hash": KEYS["bob"][1], "models": ["another-model"]},
            {"name": "carol", "hash": KEYS["carol"][1], "max_concurrent": 1}]
    yield from _start_gateway(engines, tmp_path_factory.mktemp("keyed"), auth={"keys": keys})


def _sdk(url: str, key: str, cls=openai.OpenAI):
    return cls(base_url=url + "/v1", api_key=key, max_retries=0)


def test_wrong_or_missing_key_is_an_authentication_error(keyed_gateway):
    with pytest.raises(openai.AuthenticationError):
        _sdk(keyed_gateway, "sk-gw-wrong").completions.create(model=MODEL, prompt="hi", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        _sdk(keyed_gateway, "sk-gw-wrong").models.list()
    status, body = http_json(keyed_gateway + "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi"}).encode())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # no key at all
    assert http_json(keyed_gateway + "/health")[0] == 200  # probes need no key


def test_rate_limit_is_a_rate_limit_error_with_retry_after(keyed_gateway):
    client = _sdk(keyed_gateway, KEYS["alice"][0])
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert err.value.body["code"] == "rate_limit_exceeded"


def test_key_limited_to_other_models_is_forbidden(keyed_gateway):
    client = _sdk(keyed_gateway, KEYS["bob"][0])
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert client.models.list().data == []  # it sees only the models it may use


def test_concurrency_limit_per_key(keyed_gateway):
    async def run():
        client = _sdk(keyed_gateway, KEYS["carol"][0], openai.AsyncOpenAI)
        stream = await client.completions.create(model=MODEL, prompt="long", max_tokens=300, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        await stream.close()
        deadline = time.monotonic() + 5
        while True:  # the slot frees when the gateway sees the stream end
            try:
                return await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
            except openai.RateLimitError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

    assert asyncio.run(run()).usage.completion_tokens == 1


def test_gateway_metrics_count_requests_and_decisions(client, gateway):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = urllib.request.urlopen(gateway + "/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="metrics please " * 5, max_tokens=2)
    worker, reason = raw.headers["x-sglang-gw-worker"], raw.headers["x-sglang-gw-route"]
    after = scrape()
    key = ("sglang_gw_requests_total", (("path", "/v1/completions"), ("status", "200"), ("worker", worker)))
    assert after[key] - before.get(key, 0) == 1
    key = ("sglang_gw_routing_decisions_total", (("reason", reason),))
    assert after[key] - before.get(key, 0) == 1
    assert after[("sglang_gw_worker_state", (("state", "unhealthy"), ("worker", "dead")))] == 1
    assert after[("sglang_gw_worker_state", (("state", "ready"), ("worker", "e0")))] == 1
    assert after[("sglang_gw_prefix_index_bytes", (("worker", worker),))] > 0
    # The same prompt again: the engine reports cached tokens, and the gateway counts them.
    client.completions.create(model=MODEL, prompt="metrics please " * 5, max_tokens=2)
    again = scrape()
    key = ("sglang_gw_reported_cached_tokens_total", ())
    assert again[key] - after[key] > 0


def test_burst_on_one_prefix_spreads_once_the_holder_is_over_the_load_margin(gateway):
    shared = "A long shared system prompt about routing and caches. " * 6

    async def run():
        client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="none", max_retries=0)
        await client.completions.create(model=MODEL, prompt=shared + "warm", max_tokens=1)  # one holder

        async def one(i):
            raw = await client.completions.with_raw_response.create(
                model=MODEL, prompt=shared + f"request {i}", max_tokens=120, extra_body={"ignore_eos": True})
            return raw.headers["x-sglang-gw-worker"], raw.headers["x-sglang-gw-route"]

        return await asyncio.gather(*(one(i) for i in range(16)))

    routes = asyncio.run(run())
    workers = [w for w, _ in routes]
    reasons = [r for _, r in routes]
    assert "load_guard" in reasons  # locality yielded to load
    assert len(set(workers)) == 3, routes  # and the burst reached every engine
    assert max(workers.count(w) for w in set(workers)) <= 16 - 2  # not piled onto one
