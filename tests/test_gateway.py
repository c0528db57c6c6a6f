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

import aiohttp
import openai
import pytest
import yaml

from conftest import engine_fleet
from sglang_gw.testing import DONE, free_port, http_json, sse_event
from sglang_gw.gateway.auth import new_key

MODEL = "tiny"


@pytest.fixture(scope="module")
def engines(tiny_models):
    with engine_fleet(3, str(tiny_models["llama"]), "--served-model-name", MODEL,
                      "--max-total-tokens", "20000") as engines:
        yield engines


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
    key = ("sglang_gw_reported_cached_tokens_total", (("worker", worker),))
    assert again[key] - after.get(key, 0) > 0


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


# ---- SGLang's native API through the gateway -----------------------------------------------------

LONG = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}


def _generate(url: str, body: dict) -> tuple[dict, object]:
    """(headers, JSON answer) of a POST /generate."""
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return dict(resp.headers), json.loads(resp.read())


def _wait_idle(engines) -> None:
    """Until no engine runs or queues a request (an aborted stream ends a moment after its client left)."""
    deadline = time.monotonic() + 10
    while any(info["num_running_reqs"] or info["num_queue_reqs"]
              for info in (http_json(e.url + "/get_server_info")[1] for e in engines)):
        assert time.monotonic() < deadline, "the engines did not go idle"
        time.sleep(0.05)


async def _stream_events(resp) -> list:
    return [e async for line in resp.content if (e := sse_event(line)) is not None]


def test_generate_in_all_its_forms_through_the_gateway(gateway):
    greedy = {"temperature": 0, "max_new_tokens": 4}
    _, one = _generate(gateway, {"text": "The quick brown fox", "sampling_params": greedy})
    assert one["meta_info"]["completion_tokens"] == 4
    _, batch = _generate(gateway, {"text": ["The quick brown fox", "Paris is the capital"], "sampling_params": greedy})
    assert len(batch) == 2 and batch[0]["text"] == one["text"]
    _, ids = _generate(gateway, {"input_ids": [5, 6, 7, 8], "sampling_params": greedy})
    _, ids_batch = _generate(gateway, {"input_ids": [[5, 6, 7, 8], [9, 10]], "sampling_params": greedy})
    assert ids_batch[0]["output_ids"] == ids["output_ids"] and len(ids_batch) == 2
    _, prefill = _generate(gateway, {"text": "cache me " * 20, "sampling_params": {"max_new_tokens": 0}})
    assert prefill["text"] == "" and prefill["meta_info"]["completion_tokens"] == 0
    _, scored = _generate(gateway, {"text": ["cache me " * 20 + "yes", "cache me " * 20 + "no"],
                                    "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                                    "return_logprob": True, "logprob_start_len": 5, "return_text_in_logprobs": True})
    for out in scored:  # what SGLang's `select` reads
        meta = out["meta_info"]
        assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"] - 5
        assert all(isinstance(text, str) for _, _, text in meta["input_token_logprobs"])

    async def stream():
        async with aiohttp.ClientSession() as session, session.post(gateway + "/generate", json={
                "text": "The quick brown fox", "sampling_params": greedy, "stream": True}) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream") and resp.headers["x-sglang-gw-worker"]
            return await _stream_events(resp)

    events = asyncio.run(stream())
    assert events[-1] == DONE and events[-2]["text"] == one["text"]  # cumulative text, as SGLang streams it


def test_batches_are_routed_on_their_common_prefix(gateway):
    from sglang_gw.gateway.routing_text import prompt_text

    assert prompt_text(["shared head, then a", "shared head, then b"]) == "shared head, then "
    assert prompt_text([[1, 2, 3], [1, 2, 4]]) == prompt_text([1, 2]) == "1,2,"
    assert prompt_text([1, 2, 3]).startswith(prompt_text([1, 2]))  # ids render prefix-preserving
    assert prompt_text([]) == prompt_text(None) == prompt_text([{"a": 1}]) == ""

    # SGLang's `select`: the program's text is cached alone, then its choices are scored as one batch.
    text = "A program's running text, long enough to span several routing blocks of the index. " * 3
    first, _ = _generate(gateway, {"text": text, "sampling_params": {"max_new_tokens": 0}})
    choices, _ = _generate(gateway, {"text": [text + "yes", text + "no"], "sampling_params": {"max_new_tokens": 0},
                                     "return_logprob": True})
    assert (choices["x-sglang-gw-worker"], choices["x-sglang-gw-route"]) == (first["x-sglang-gw-worker"], "cache_hit")
    ids = list(range(3, 90))
    first, _ = _generate(gateway, {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}})
    batch, _ = _generate(gateway, {"input_ids": [ids + [100], ids + [101, 102]], "sampling_params": {"max_new_tokens": 0}})
    assert (batch["x-sglang-gw-worker"], batch["x-sglang-gw-route"]) == (first["x-sglang-gw-worker"], "cache_hit")


def test_server_info_is_one_workers_info_with_the_fleets_load(gateway, engines):
    status, fleet = http_json(gateway + "/get_server_info")
    assert status == 200 and http_json(gateway + "/server_info")[1].keys() == fleet.keys()
    own = [http_json(e.url + "/get_server_info")[1] for e in engines]
    assert fleet["model_path"] == own[0]["model_path"] and fleet["served_model_name"] == MODEL
    assert fleet["max_total_num_tokens"] == sum(info["max_total_num_tokens"] for info in own)
    workers = {w["name"]: w for w in fleet["workers"]}
    assert set(workers) == {"e0", "e1", "e2", "dead"}
    assert workers["dead"]["state"] == "unhealthy" and workers["dead"]["info"] is None
    for i, engine in enumerate(engines):
        info = workers[f"e{i}"]["info"]
        assert workers[f"e{i}"]["url"] == engine.url and info["port"] == engine.port
    _, model = http_json(gateway + "/get_model_info")
    assert model == http_json(engines[0].url + "/get_model_info")[1] == http_json(gateway + "/model_info")[1]


def test_flush_cache_empties_every_engines_cache(gateway, engines):
    prompt = {"text": "flush me, flush me, flush me " * 4, "sampling_params": {"max_new_tokens": 0}}

    def cached_on_each() -> list[int]:
        return [_generate(e.url, prompt)[1]["meta_info"]["cached_tokens"] for e in engines]

    _wait_idle(engines)
    cached_on_each()
    assert all(cached_on_each())  # each engine holds the prompt now
    for method, body in (("POST", b""), ("GET", None)):
        request = urllib.request.Request(gateway + "/flush_cache", data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as resp:
            out = json.loads(resp.read())
        assert out["success"] is True and out["workers"] == {
            f"e{i}": {"success": True, "message": "Cache flushed.", "status": 200} for i in range(3)}
    assert cached_on_each() == [0, 0, 0]


def test_flush_cache_is_refused_while_a_request_runs(gateway, engines):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(engines[1].url + "/generate", json={
                    "text": "busy", "sampling_params": LONG, "stream": True}) as resp:
                await resp.content.readline()
                async with session.post(gateway + "/flush_cache") as flush:
                    return flush.status, await flush.json()

    _wait_idle(engines)
    status, out = asyncio.run(run())
    assert status == 400 and out["error"]["code"] == "worker_refused"
    message = out["error"]["message"]
    assert "e1: 400 busy" in message and "e0" not in message and "e2" not in message, message
    _wait_idle(engines)
    assert http_json(gateway + "/flush_cache", b"")[0] == 200


def test_abort_request_reaches_the_engine_running_it(gateway, engines):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(engines[2].url + "/generate", json={
                    "text": "abort me", "rid": "gw-abort-me", "sampling_params": LONG, "stream": True}) as resp:
                await resp.content.readline()
                async with session.post(gateway + "/abort_request", json={"rid": "gw-abort-me"}) as abort:
                    answer = abort.status, await abort.json()
                return answer, await _stream_events(resp)

    (status, out), events = asyncio.run(run())
    assert status == 200 and out["success"] is True and set(out["workers"]) == {"e0", "e1", "e2"}
    assert events[-1] == DONE and events[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    assert http_json(gateway + "/abort_request", json.dumps({"abort_all": True}).encode())[0] == 200
    for body in ({}, {"rid": 5}, [1], {"rid": ""}):
        status, out = http_json(gateway + "/abort_request", json.dumps(body).encode())
        assert (status, out["error"]["param"]) == (400, "rid"), body


@pytest.mark.parametrize("method, path", [
    ("GET", "/get_model_info"), ("GET", "/model_info"), ("GET", "/get_server_info"), ("GET", "/server_info"),
    ("POST", "/flush_cache"), ("GET", "/flush_cache"), ("POST", "/abort_request"),
])
def test_sglang_control_endpoints_need_a_key(keyed_gateway, engines, method, path):
    body = json.dumps({"abort_all": True}).encode() if path == "/abort_request" else b""
    status, out = http_json(keyed_gateway + path, body if method == "POST" else None)
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    _wait_idle(engines)
    status, out = http_json(keyed_gateway + path, body if method == "POST" else None,
                            headers={"Authorization": f"Bearer {KEYS['bob'][0]}"})
    assert status == 200, out



def test_fanned_out_answer_names_each_failing_worker():
    from sglang_gw.errors import APIError
    from sglang_gw.gateway.app import Reply, fanned_out

    done = fanned_out("cache flush", {"a": Reply(200, {"success": True}), "b": Reply(200, "Cache flushed.")})
    assert json.loads(done.body)["workers"] == {"a": {"success": True, "status": 200},
                                                "b": {"message": "Cache flushed.", "status": 200}}  # SGLang: text
    busy = Reply(400, {"error": {"message": "requests are running", "code": "busy"}})
    for replies, status, message in [
        ({"a": Reply(200, {}), "b": busy}, 400, "failed on 1 of 2 workers (b: 400 busy: requests are running)"),
        ({"a": Reply(None, "ClientConnectorError"), "b": busy, "c": Reply(400, "Not flushed.")}, 502,
         "(a: ClientConnectorError; b: 400 busy: requests are running; c: status 400: Not flushed.)"),
        ({}, 503, "no worker is ready"),
    ]:
        with pytest.raises(APIError) as err:
            fanned_out("cache flush", replies)
        assert err.value.status == status and message in err.value.message, err.value.message
