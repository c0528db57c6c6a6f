"""The engine's HTTP server, black-box: SGLang's native endpoints, errors, metrics, aborts, shutdown.

Talks plain HTTP to real `sglang-gw engine` processes on the tiny random-weight Llama: the shared
`tiny_server`, one small-limits server for 413 / 503, and throwaway ones for SIGTERM and crash cases.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import EngineProcess
from sglang_gw.testing import DONE, sse_event

GREEDY = {"temperature": 0, "max_new_tokens": 8}
LONG = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}  # clipped to the 2048 context
META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}


def fresh_ids(seed: int, n: int) -> list[int]:
    """A prompt no other test sends (so nothing of it is cached yet)."""
    return random.Random(seed).choices(range(3, 500), k=n)


# ---- HTTP helpers -------------------------------------------------------------------------------


async def fetch(session: aiohttp.ClientSession, method: str, url: str, body=None, *, data: bytes | None = None):
    """(status, headers, parsed JSON body or None)."""
    async with session.request(method, url, json=body if data is None else None, data=data) as resp:
        text = await resp.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return resp.status, resp.headers, parsed


def http(method: str, url: str, body=None, *, data: bytes | None = None):
    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            return await fetch(session, method, url, body, data=data)

    return asyncio.run(go())


def generate(url: str, body: dict):
    status, _, out = http("POST", url + "/generate", body)
    assert status == 200, out
    return out


async def sse(resp: aiohttp.ClientResponse):
    """Parsed `data:` events of an SSE response, DONE last."""
    async for line in resp.content:
        if (event := sse_event(line)) is not None:
            yield event


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics (buckets left out), keyed by sample name; checks the families' types."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:  # sync: also called inside event loops
        text = resp.read().decode()
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            if not s.name.endswith("_bucket"):
                assert s.labels.get("model_name") == "tiny", s
                samples[s.name] = s.value
    assert types["sglang:num_aborted_requests"] == "counter"
    assert types["sglang:time_to_first_token_seconds"] == "histogram"
    return samples


async def wait_until(url: str, predicate, timeout: float = 5.0) -> dict:
    """Poll /get_server_info until predicate(info) holds."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            _, _, info = await fetch(session, "GET", url + "/get_server_info")
            if predicate(info):
                return info
            assert time.monotonic() < deadline, f"server info never matched: {info}"
            await asyncio.sleep(0.02)


def param_ok(actual: str | None, expected: str | tuple[str, ...] | None) -> bool:
    """The error's param names the field: one of the expected names, or a path below one of them."""
    if expected is None:
        return actual is None
    names = (expected,) if isinstance(expected, str) else expected
    return isinstance(actual, str) and any(actual == n or actual.startswith(n + ".") for n in names)


def assert_error(status: int, body, want_status: int, param=None, code: str | None = None):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                           413: "invalid_request_error", 503: "service_unavailable"}[want_status]
    assert param_ok(err["param"], param), err
    if code is not None:
        assert err["code"] == code, err


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tiny_models):
    """One running request at most, no queue, 2000-byte bodies: for 413 and 503."""
    with EngineProcess(str(tiny_models["llama"]), "--served-model-name", "tiny", "--max-total-tokens", "20000",
                       "--max-running-requests", "1", "--max-queued-requests", "0",
                       "--max-request-bytes", "2000") as server:
        yield server


# ---- /generate ----------------------------------------------------------------------------------


def check_output(out: dict, completion_tokens: int, prompt_tokens: int | None = None) -> None:
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert set(meta) == META_KEYS, meta
    assert meta["finish_reason"] == {"type": "length", "length": completion_tokens}
    assert meta["completion_tokens"] == len(out["output_ids"]) == completion_tokens
    assert all(isinstance(t, int) for t in out["output_ids"])
    assert isinstance(out["text"], str)
    if prompt_tokens is not None:
        assert meta["prompt_tokens"] == prompt_tokens
    assert isinstance(meta["cached_tokens"], int) and 0 <= meta["cached_tokens"] <= meta["prompt_tokens"]
    assert isinstance(meta["e2e_latency"], float) and meta["e2e_latency"] > 0
    assert isinstance(meta["id"], str) and meta["id"]


def test_generate_single_and_batch_in_order(tiny_server):
    prompts = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]
    singles = [generate(tiny_server.url, {"text": p, "sampling_params": GREEDY}) for p in prompts]
    for out in singles:
        check_output(out, 8)
    assert len({s["text"] for s in singles}) == 3, "the prompts must give different outputs to tell the order"

    batch = generate(tiny_server.url, {"text": prompts, "sampling_params": GREEDY, "rid": ["a", "b", "c"]})
    assert isinstance(batch, list) and len(batch) == 3
    for out, single, rid in zip(batch, singles, "abc"):
        check_output(out, 8, single["meta_info"]["prompt_tokens"])
        assert (out["text"], out["output_ids"]) == (single["text"], single["output_ids"])
        assert out["meta_info"]["id"] == rid


def test_generate_input_ids_and_per_item_sampling_params(tiny_server):
    ids = fresh_ids(1, 7)
    single = generate(tiny_server.url, {"input_ids": ids, "sampling_params": GREEDY})
    check_output(single, 8, prompt_tokens=7)
    assert single["meta_info"]["cached_tokens"] == 0

    batch = generate(tiny_server.url, {
        "input_ids": [ids, fresh_ids(2, 5)],
        "sampling_params": [dict(GREEDY, max_new_tokens=3), dict(GREEDY, max_new_tokens=5)],
    })
    assert len(batch) == 2
    check_output(batch[0], 3, prompt_tokens=7)
    check_output(batch[1], 5, prompt_tokens=5)
    assert batch[0]["output_ids"] == single["output_ids"][:3]
    assert batch[0]["meta_info"]["id"] != batch[1]["meta_info"]["id"]


def test_stream_is_cumulative_and_matches_non_stream(tiny_server):
    body = {"text": "Radix attention reuses", "sampling_params": dict(GREEDY, max_new_tokens=24)}
    expected = generate(tiny_server.url, body)

    async def go():
        async with aiohttp.ClientSession() as session, \
                session.post(tiny_server.url + "/generate", json=dict(body, stream=True)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            return [event async for event in sse(resp)]

    events = asyncio.run(go())
    assert events[-1] == DONE and DONE not in events[:-1], "one [DONE], at the end"
    events = events[:-1]
    assert len(events) > 1
    for before, after in zip(events, events[1:]):
        assert after["text"].startswith(before["text"])
        assert after["output_ids"][:len(before["output_ids"])] == before["output_ids"]
        assert before["meta_info"]["finish_reason"] is None
    last = events[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    assert (last["text"], last["output_ids"]) == (expected["text"], expected["output_ids"])


def test_max_new_tokens_zero_caches_the_prefix(tiny_server):
    prefix = fresh_ids(3, 100)
    first = generate(tiny_server.url, {"input_ids": prefix, "sampling_params": {"max_new_tokens": 0}})
    assert first["output_ids"] == [] and first["text"] == ""
    assert first["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert first["meta_info"]["completion_tokens"] == 0 and first["meta_info"]["cached_tokens"] == 0

    second = generate(tiny_server.url, {"input_ids": prefix + fresh_ids(4, 10), "sampling_params": GREEDY})
    check_output(second, 8, prompt_tokens=110)
    assert second["meta_info"]["cached_tokens"] >= 100


def test_prompt_and_output_logprobs(tiny_server):
    ids = fresh_ids(5, 12)
    out = generate(tiny_server.url, {
        "input_ids": ids, "sampling_params": dict(GREEDY, max_new_tokens=4), "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True,
    })
    meta = out["meta_info"]
    inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inputs) == meta["prompt_tokens"] == 12
    assert len(outputs) == meta["completion_tokens"] == 4
    for triple in inputs + outputs:
        assert len(triple) == 3 and isinstance(triple[1], int) and isinstance(triple[2], str)
    assert inputs[0][0] is None
    assert all(isinstance(lp, float) and lp <= 0 for lp, _, _ in inputs[1:] + outputs)
    assert [t for _, t, _ in inputs] == ids
    assert [t for _, t, _ in outputs] == out["output_ids"]

    tops = meta["input_top_logprobs"][1:] + meta["output_top_logprobs"]
    assert len(tops) == 11 + 4
    for top in tops:
        assert len(top) == 2 and top[0][0] >= top[1][0]
        assert all(isinstance(t, int) and isinstance(text, str) for _, t, text in top)
    for (lp, token, text), top in zip(outputs, meta["output_top_logprobs"]):
        assert [lp, token, text] == top[0], "greedy picks the most likely token"
    for (lp, _, _), top in zip(inputs[1:], meta["input_top_logprobs"][1:]):
        assert lp <= top[0][0] + 1e-6


# ---- aborts -------------------------------------------------------------------------------------


async def assert_aborted_once(url: str, aborted_before: float) -> None:
    await wait_until(url, lambda info: info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0)
    assert metrics(url)["sglang:num_aborted_requests_total"] == aborted_before + 1


def test_client_disconnect_mid_stream_aborts(tiny_server):
    url = tiny_server.url
    before = metrics(url)["sglang:num_aborted_requests_total"]

    async def go():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(url + "/generate", json={"text": "hi", "sampling_params": LONG, "stream": True})
            events = sse(resp)
            for _ in range(3):
                assert (await anext(events))["meta_info"]["finish_reason"] is None
            resp.close()  # drops the connection
        await assert_aborted_once(url, before)

    asyncio.run(go())


def test_client_cancel_of_non_stream_request_aborts(tiny_server):
    url = tiny_server.url
    before = metrics(url)["sglang:num_aborted_requests_total"]

    async def go():
        async with aiohttp.ClientSession() as session:
            body = {"text": "hi", "sampling_params": LONG}
            task = asyncio.create_task(fetch(session, "POST", url + "/generate", body))
            await wait_until(url, lambda info: info["num_running_reqs"] == 1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(task, 0.05)
        await assert_aborted_once(url, before)

    asyncio.run(go())


# ---- errors -------------------------------------------------------------------------------------

TOO_LONG = fresh_ids(6, 2100)
SP = {"max_new_tokens": 2}


def case(name, body, status=400, param=None, code=None, *, path="/generate", method="POST", server="tiny_server"):
    return pytest.param(server, method, path, body, status, param, code, id=name)


def with_sp(**params) -> dict:
    return {"text": "a", "sampling_params": params}


BAD_INPUTS = [
    case("malformed-json", b'{"text": "a",', code="invalid_json"),
    case("json-array", [1, 2], code="invalid_json"),
    case("no-input", {"sampling_params": SP}),
    case("text-and-ids", {"text": "a", "input_ids": [5]}),
    case("text-number", {"text": 5}, param="text"),
    case("ids-not-int", {"input_ids": [5, "x"]}, param="input_ids"),
    case("sp-not-object", {"text": "a", "sampling_params": "x"}, param="sampling_params"),
    case("stream-not-bool", {"text": "a", "stream": "yes"}, param="stream"),
    case("temperature", with_sp(temperature=-1), param="temperature", code="invalid_value"),
    case("top-p", with_sp(top_p=0), param="top_p"),
    case("top-k", with_sp(top_k=0), param="top_k"),
    case("max-new-tokens-str", with_sp(max_new_tokens="ten"), param="max_new_tokens"),
    case("min-over-max", with_sp(max_new_tokens=2, min_new_tokens=3), param="min_new_tokens"),
    case("unknown-param", with_sp(beam_width=4), param="beam_width"),
    case("regex", with_sp(regex="a(b"), param="regex", code="invalid_value"),
    case("json-schema-not-json", with_sp(json_schema="{no"), param="json_schema", code="invalid_value"),
    case("ebnf", with_sp(ebnf="root ::= (("), param="ebnf", code="invalid_value"),
    case("two-grammars", with_sp(regex="a", json_schema="{}"), param="json_schema", code="invalid_value"),
    case("stop-regex", with_sp(stop_regex=["("]), param="stop_regex", code="invalid_value"),
    case("stop-number", with_sp(stop=5), param="stop"),
    case("too-long", {"input_ids": TOO_LONG}, param="input_ids", code="context_length_exceeded"),
    case("out-of-vocab", {"input_ids": [5, 999999]}, param="input_ids", code="invalid_value"),
    case("negative-id", {"input_ids": [-1]}, param="input_ids", code="invalid_value"),
    case("empty-text", {"text": ""}, param="text", code="invalid_value"),
    case("empty-batch", {"text": []}, param="text"),
    case("batch-sp-length", {"text": ["a", "b", "c"], "sampling_params": [SP, SP]}, param="sampling_params"),
    case("batch-rid-length", {"text": ["a", "b"], "rid": ["x"]}, param="rid"),
    case("resume-not-a-choice", {"text": "a", "resume_output_ids": {"1": [5]}}, param="resume_output_ids"),
    case("resume-not-ids", {"text": "a", "resume_output_ids": {"0": "x"}}, param="resume_output_ids"),
    case("resume-out-of-vocab", {"text": "a", "resume_output_ids": {"0": [999999]}}, param="resume_output_ids",
         code="invalid_value"),
    case("resume-past-max", {"text": "a", "sampling_params": SP, "resume_output_ids": {"0": [5, 6, 7]}},
         param="resume_output_ids", code="invalid_value"),
    case("chat-no-messages", {"model": "tiny", "messages": []}, param="messages", path="/v1/chat/completions"),
    case("chat-bad-role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
         param="messages.0.role", path="/v1/chat/completions"),
    case("chat-too-long", {"model": "tiny", "messages": [{"role": "user", "content": "hello " * 2100}]},
         param="messages", code="context_length_exceeded", path="/v1/chat/completions"),
    case("chat-regex", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "regex": "[a-"},
         param="regex", code="invalid_value", path="/v1/chat/completions"),
    case("unknown-model", {"model": "gpt-9", "prompt": "hi"}, 404, "model", "model_not_found", path="/v1/completions"),
    case("unknown-path", {}, 404, code="not_found", path="/no/such/path"),
    case("get-generate", None, 405, code="method_not_allowed", method="GET"),
    case("abort-no-rid", {}, param="rid", path="/abort_request"),
    case("too-large", {"text": "x" * 3000}, 413, code="body_too_large", server="small_server"),
]


@pytest.mark.parametrize("server,method,path,body,status,param,code", BAD_INPUTS)
def test_bad_input(request, server, method, path, body, status, param, code):
    url = request.getfixturevalue(server).url
    raw = body if isinstance(body, bytes) else None
    got, _, out = http(method, url + path, None if raw else body, data=raw)
    assert_error(got, out, status, param, code)


@pytest.mark.parametrize("body,param", [
    ({"text": 5}, "text"),
    ({"input_ids": [5, "x"]}, "input_ids.1"),  # the field and the offending index
    ({"text": "a", "sampling_params": "x"}, "sampling_params"),
    ({"input_ids": TOO_LONG}, "input_ids"),
], ids=["text-number", "ids-not-int", "sp-not-object", "too-long-ids"])
def test_bad_input_param_names_the_request_field(tiny_server, body, param):
    status, _, out = http("POST", tiny_server.url + "/generate", body)
    assert_error(status, out, 400, param)
    assert out["error"]["param"] == param


def test_still_serves_after_bad_inputs(tiny_server, small_server):
    for server in (tiny_server, small_server):
        assert http("GET", server.url + "/health")[0] == 200
        check_output(generate(server.url, {"text": "hello", "sampling_params": GREEDY}), 8)


def test_queue_full_is_503_with_retry_after(small_server):
    url = small_server.url

    async def go():
        async with aiohttp.ClientSession() as session:
            held = await session.post(url + "/generate", json={"text": "hi", "stream": True, "sampling_params": LONG})
            try:
                assert held.status == 200
                await anext(sse(held))  # admitted and running
                status, headers, out = await fetch(session, "POST", url + "/generate", with_sp(**SP))
                assert_error(status, out, 503, None, "queue_full")
                assert int(headers["Retry-After"]) >= 1
            finally:
                held.close()
            await wait_until(url, lambda info: info["inflight_requests"] == 0 and info["num_running_reqs"] == 0)
            status, _, out = await fetch(session, "POST", url + "/generate", {"text": "a", "sampling_params": GREEDY})
            assert status == 200 and out["meta_info"]["completion_tokens"] == 8

    asyncio.run(go())


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_count_a_request_exactly(tiny_server):
    before = metrics(tiny_server.url)
    out = generate(tiny_server.url, {"input_ids": fresh_ids(7, 9), "sampling_params": dict(GREEDY, max_new_tokens=11)})
    after = metrics(tiny_server.url)

    def delta(name):
        return after[name] - before[name]

    assert delta("sglang:prompt_tokens_total") == 9
    assert delta("sglang:generation_tokens_total") == out["meta_info"]["completion_tokens"] == 11
    assert delta("sglang:num_requests_total") == 1
    assert delta("sglang:num_aborted_requests_total") == 0
    assert delta("sglang:time_to_first_token_seconds_count") == 1
    assert delta("sglang:e2e_request_latency_seconds_count") == 1
    assert delta("sglang:e2e_request_latency_seconds_sum") > 0
    for gauge in ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage", "cache_hit_rate",
                  "gen_throughput", "max_total_num_tokens", "num_retracted_reqs"):
        assert f"sglang:{gauge}" in after
    assert after["sglang:max_total_num_tokens"] == 20000
    assert after["sglang:num_running_reqs"] == 0


# ---- other native endpoints ---------------------------------------------------------------------


def test_info_and_health_endpoints(tiny_server):
    url = tiny_server.url
    status, _, health = http("GET", url + "/health")
    # The scheduler's heartbeat: steps done (the warm-up's at least); idle, so no time without progress.
    assert status == 200 and health.pop("steps") >= 1
    assert health == {"status": "ok", "busy": False, "since_progress_s": 0.0}
    # For probes that read only the status (Kubernetes): 503 "stuck" only when busy past the limit.
    assert http("GET", url + "/health?max_since_progress=0")[0] == 200  # idle is never stuck
    status, _, body = http("GET", url + "/health?max_since_progress=soon")
    assert_error(status, body, 400, "max_since_progress")
    assert http("GET", url + "/health_generate")[::2] == (200, {"status": "ok"})
    status, _, model = http("GET", url + "/get_model_info")
    assert status == 200 and model["is_generation"] is True and model["model_path"]
    status, _, info = http("GET", url + "/get_server_info")
    assert status == 200
    assert info["max_total_num_tokens"] == 20000
    assert (info["num_running_reqs"], info["num_queue_reqs"]) == (0, 0)
    assert 0 <= info["token_usage"] <= 1 and 0 <= info["cache_hit_rate"] <= 1


def test_health_with_a_progress_limit_says_stuck_when_busy_past_it(tiny_server):
    """A scheduler with work that has gone longer than the limit without a finished step answers 503
    "stuck". A limit below zero makes any busy moment "stuck": the mechanism, without a real hang."""
    body = {"text": "busy", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}, "stream": True}

    async def while_busy():
        async with aiohttp.ClientSession() as session:
            async with session.post(tiny_server.url + "/generate", json=body) as resp:
                await resp.content.readline()  # generating now
                async with session.get(tiny_server.url + "/health?max_since_progress=-1") as stuck:
                    return stuck.status, await stuck.json()

    status, health = asyncio.run(while_busy())
    assert status == 503 and health["status"] == "stuck" and health["busy"] is True


def test_flush_cache_idle_and_busy(tiny_server):
    url = tiny_server.url
    prefix = fresh_ids(8, 40)
    generate(url, {"input_ids": prefix, "sampling_params": {"max_new_tokens": 0}})
    for method in ("POST", "GET"):
        status, _, out = http(method, url + "/flush_cache")
        assert status == 200 and out["success"] is True
    again = generate(url, {"input_ids": prefix, "sampling_params": {"max_new_tokens": 0}})
    assert again["meta_info"]["cached_tokens"] == 0, "the flush emptied the cache"

    async def go():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(url + "/generate", json={"text": "hi", "stream": True, "sampling_params": LONG})
            try:
                await anext(sse(resp))
                status, _, out = await fetch(session, "POST", url + "/flush_cache")
                assert_error(status, out, 400, None, "busy")
            finally:
                resp.close()
            await wait_until(url, lambda info: info["num_running_reqs"] == 0)

    asyncio.run(go())


def test_abort_request_ends_the_stream(tiny_server):
    url = tiny_server.url

    async def go():
        async with aiohttp.ClientSession() as session:
            body = {"text": "hi", "stream": True, "sampling_params": LONG, "rid": "abort-me"}
            async with session.post(url + "/generate", json=body) as resp:
                events = sse(resp)
                assert (await anext(events))["meta_info"]["id"] == "abort-me"
                status, _, out = await fetch(session, "POST", url + "/abort_request", {"rid": "abort-me"})
                assert (status, out) == (200, {"success": True})
                rest = [event async for event in events]
        assert rest[-1] == DONE
        last = rest[-2]["meta_info"]
        assert last["finish_reason"]["type"] == "abort"
        assert last["completion_tokens"] < 2000
        assert all(e["meta_info"]["finish_reason"] is None for e in rest[:-2])

    asyncio.run(go())


# ---- process lifecycle --------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests(tiny_models):
    # One running at a time, so the 8 requests take long enough (~0.5 s) for SIGTERM to land mid-way.
    server = EngineProcess(str(tiny_models["llama"]), "--max-total-tokens", "20000", "--max-running-requests", "1")
    try:
        url = server.wait_ready().url

        async def one(session, i):
            body = {"input_ids": fresh_ids(100 + i, 1000), "sampling_params": dict(LONG, max_new_tokens=60)}
            status, _, out = await fetch(session, "POST", url + "/generate", body)
            return status, out, time.monotonic()

        async def go():
            async with aiohttp.ClientSession() as session:
                tasks = [asyncio.create_task(one(session, i)) for i in range(8)]
                await wait_until(url, lambda info: info["inflight_requests"] == 8, timeout=10)
                server.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                # Once /health says draining, new requests are refused (or the port is already closed).
                try:
                    while (await fetch(session, "GET", url + "/health"))[0] == 200:
                        await asyncio.sleep(0.01)
                    status, headers, out = await fetch(session, "POST", url + "/generate", {"text": "a"})
                    assert_error(status, out, 503, None, "unavailable")
                    assert "Retry-After" in headers
                except aiohttp.ClientConnectionError:
                    pass
                return await asyncio.gather(*tasks), signalled

        results, signalled = asyncio.run(go())
        for status, out, _ in results:
            assert status == 200, out
            assert out["meta_info"]["completion_tokens"] == 60
            assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
        assert max(done for _, _, done in results) > signalled, "some requests were still running at SIGTERM"
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("body,param", [
    ({"return_logprob": True, "top_logprobs_num": 1000}, "top_logprobs_num"),
    ({"sampling_params": dict(SP, logit_bias={"999999": 1.0})}, "logit_bias"),
    ({"sampling_params": dict(SP, min_new_tokens=1, stop_token_ids=[999999])}, "stop_token_ids"),
], ids=["top-logprobs-num", "logit-bias", "stop-token-ids"])
def test_request_cannot_kill_the_engine(tiny_server, body, param):
    url = tiny_server.url

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session:
            status, _, out = await fetch(session, "POST", url + "/generate", dict({"input_ids": [5, 6]}, **body))
            if status != 200:  # rejecting is right; so is clamping (e.g. top_logprobs_num to the vocab size)
                assert_error(status, out, 400, param)
            assert (await fetch(session, "GET", url + "/health"))[0] == 200
            status, _, out = await fetch(session, "POST", url + "/generate", {"text": "a", "sampling_params": SP})
            assert status == 200, out

    asyncio.run(go())
