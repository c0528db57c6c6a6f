"""Hostile and malformed requests (issue 12): every one a 4xx with an OpenAI error body naming the field,
never a 5xx, never a crashed or overloaded engine; at the engine and through the gateway."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from urllib.parse import urlsplit

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import engine_fleet
from test_gateway import _start_gateway
from sglang_gw.limits import (MAX_BATCH, MAX_JSON_DEPTH, MAX_LOGIT_BIAS, MAX_N, MAX_STOP, MAX_STOP_TOKEN_IDS,
                              MAX_TOP_LOGPROBS)
from sglang_gw.errors import APIError, parse_json, parse_json_to_read
from sglang_gw.testing import sse_event

MODEL = "tiny"
CAPACITY = 64  # each engine's max_running_requests + max_queued_requests, below MAX_N: a 400 by capacity
CHEAP = {"max_tokens": 2, "temperature": 0}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"


@pytest.fixture(scope="module")
def engines(tiny_models):
    with engine_fleet(2, str(tiny_models["llama"]), "--served-model-name", MODEL, "--max-total-tokens", "20000",
                      "--max-running-requests", "4", "--max-queued-requests", str(CAPACITY - 4)) as engines:
        yield engines


@pytest.fixture(scope="module")
def gateway(engines, tmp_path_factory):
    yield from _start_gateway(engines, tmp_path_factory.mktemp("hostile-gateway"))


@pytest.fixture(params=["engine", "gateway"])
def url(request, engines):
    return engines[0].url if request.param == "engine" else request.getfixturevalue("gateway")


def send(base: str, path: str, data: bytes, method: str = "POST") -> tuple[int, object]:
    """One request with exactly these bytes; (status, the JSON body, or the raw text of an event stream)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.getheader("Content-Type", "").startswith("text/event-stream"):
        return resp.status, raw.decode()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def post(base: str, path: str, body: dict) -> tuple[int, object]:
    return send(base, path, json.dumps(body).encode())


def assert_openai_error(status: int, body: object) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), body
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                             413: "invalid_request_error"}[status], body


def assert_refused(status: int, body: object, param: str | None, code: str | None = None) -> None:
    assert status == 400, body
    assert_openai_error(status, body)
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **CHEAP, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", **CHEAP, **fields}


def native(sampling: dict | None = None, **fields) -> dict:
    return {"text": "hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0, **(sampling or {})}, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- targeted cases: (path, body, the param the 400 names) ----------------------------------------------

CASES = {
    # The gateway's routing text used to crash on these (500).
    "messages-a-number": (CHAT, chat(messages=5), "messages"),
    "content-parts-not-strings": (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
                                  "messages.0.content"),
    "content-parts-numbers": (CHAT, chat(messages=[{"role": "user", "content": [1, 2]}]), "messages.0.content"),
    "message-a-list": (CHAT, chat(messages=[["user", "hi"]]), "messages.0"),
    "model-an-object": (CHAT, chat(model={"a": 1}), "model"),
    # Sizes that expand a request: n, the batch, prompts × n.
    "n-2**63": (CHAT, chat(n=2**63), "n"),
    "n-100000": (COMPLETIONS, completion(n=100_000), "n"),
    "n-over-cap": (COMPLETIONS, completion(n=MAX_N + 1), "n"),
    "n-over-capacity": (COMPLETIONS, completion(n=CAPACITY + 1), "n"),
    "native-n-2**63": (GENERATE, native({"n": 2**63}), "n"),
    "batch-over-cap": (COMPLETIONS, completion(prompt=["a"] * (MAX_BATCH + 1)), "prompt"),
    "native-batch-over-cap": (GENERATE, native(text=["a"] * (MAX_BATCH + 1)), "text"),
    "native-ids-batch-over-capacity": (GENERATE, {"input_ids": [[5, 6]] * (CAPACITY + 1),
                                                  "sampling_params": {"max_new_tokens": 1}}, "input_ids"),
    "prompts-times-n-over-capacity": (COMPLETIONS, completion(prompt=["a", "b", "c"], n=CAPACITY // 2), "n"),
    # Lists with a cap.
    "stop-over-cap": (CHAT, chat(stop=[f"s{i}" for i in range(MAX_STOP + 1)]), "stop"),
    "stop-regex-over-cap": (GENERATE, native({"stop_regex": [f"x{i}" for i in range(MAX_STOP + 1)]}), "stop_regex"),
    "stop-token-ids-over-cap": (COMPLETIONS, completion(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))),
                                "stop_token_ids"),
    "logit-bias-over-cap": (CHAT, chat(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias"),
    "logit-bias-out-of-range": (CHAT, chat(logit_bias={"5": 1e30}), "logit_bias"),
    "top-logprobs-over-cap": (CHAT, chat(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1), "top_logprobs"),
    "completion-logprobs-2**63": (COMPLETIONS, completion(logprobs=2**63), "logprobs"),
    "top-logprobs-num-over-cap": (GENERATE, native(return_logprob=True, top_logprobs_num=MAX_TOP_LOGPROBS + 1),
                                  "top_logprobs_num"),
    # Huge integers.
    "max-tokens-2**63": (CHAT, chat(max_tokens=2**63), "max_tokens"),
    "max-completion-tokens-10**30": (CHAT, chat(max_completion_tokens=10**30), "max_completion_tokens"),
    "max-tokens-negative": (COMPLETIONS, completion(max_tokens=-1), "max_tokens"),
    "seed-10**30": (COMPLETIONS, completion(seed=10**30), "seed"),
    "sampling-seed-2**64": (GENERATE, native({"sampling_seed": 2**64}), "sampling_seed"),
    "top-k-2**63": (CHAT, chat(top_k=2**63), "top_k"),
    "max-new-tokens-10**30": (GENERATE, native({"max_new_tokens": 10**30}), "max_new_tokens"),
    "logprob-start-len-2**63": (GENERATE, native(logprob_start_len=2**63), "logprob_start_len"),
    # Numbers that are not finite.
    "temperature-overflowing-float": (CHAT, chat(temperature=10**400), "temperature"),
    "native-temperature-overflowing-int": (GENERATE, native({"temperature": 10**400}), "temperature"),
    # Wrong types.
    "stream-a-string": (CHAT, chat(stream="yes"), "stream"),
    "sampling-params-a-number": (GENERATE, {"text": "hi", "sampling_params": 5}, "sampling_params"),
    "stop-a-number": (GENERATE, native({"stop": 5}), "stop"),
    "prompt-an-object": (COMPLETIONS, completion(prompt={"a": 1}), "prompt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_field_is_a_400_naming_it(url, case):
    path, body, param = CASES[case]
    status, out = post(url, path, body)
    assert_refused(status, out, param)


@pytest.mark.parametrize("path,raw,param", [
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": NaN}',
     "temperature"),
    (COMPLETIONS, '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "top_p": Infinity}', "top_p"),
    (GENERATE, '{"text": "hi", "sampling_params": {"max_new_tokens": 2, "min_p": -Infinity}}', "min_p"),
    (GENERATE, '{"text": "hi", "sampling_params": {"max_new_tokens": 2, "logit_bias": {"5": NaN}}}', "logit_bias"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1e999}',
     "temperature"),
], ids=["nan", "infinity", "native-minus-infinity", "native-nan-bias", "1e999"])
def test_a_number_that_is_not_finite_is_a_400_naming_the_field(url, path, raw, param):
    status, out = send(url, path, raw.encode())
    assert_refused(status, out, param)


@pytest.mark.parametrize("path,raw", [
    (CHAT, '{"model": "tiny", "messages": ' + nested(2000) + "}"),
    (GENERATE, nested(2000)),
    (COMPLETIONS, "[" * 2000),  # unclosed: json.loads would recurse as deep before noticing
    (GENERATE, '{"text": "a", "sampling_params": {"json_schema": ' + "{\"a\": " * 2000 + "1" + "}" * 2001 + "}"),
    (COMPLETIONS, '{"model": "tiny", "prompt": "hi", "n": ' + "9" * 5000 + "}"),  # over Python's digit limit
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),  # a lone surrogate
    (GENERATE, '{"text": "hi"'),
    (GENERATE, b'{"text": "\xc3\x28"}'),
], ids=["deep-messages", "deep-top-level", "unclosed", "deep-schema", "5000-digits", "lone-surrogate", "truncated",
        "not-utf8"])
def test_malformed_json_is_a_400(url, path, raw):
    status, out = send(url, path, raw if isinstance(raw, bytes) else raw.encode())
    assert_refused(status, out, None, "invalid_json")


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9 \\ud83d\\ude00"}], "n": 2}',
    b'{"prompt": [1, 2, 3], "temperature": 0.5, "stop": null, "x": [true, false, {}]}',
    b'{"temperature": NaN, "top_p": Infinity, "t": 1e999}',  # orjson refuses these: the exact parse takes them
    ("{\"extra\": " + nested(MAX_JSON_DEPTH - 1) + "}").encode(),  # at the cap, through the nesting check
    ("{\"extra\": " + nested(MAX_JSON_DEPTH) + "}").encode(),
    b'{"content": "\\ud800"}', b'{"text": "\xc3\x28"}', b'{"text": "hi"', b"[" * 2000,
    b'{"n": ' + b"9" * 400 + b"}", b'{"n": ' + b"9" * 5000 + b"}", b'\xef\xbb\xbf{"a": 1}', '{"a": 1}'.encode("utf-16"),
], ids=["chat", "ids-and-literals", "not-finite", "nested-to-the-cap", "nested-past-the-cap", "lone-surrogate",
        "not-utf8", "truncated", "unclosed", "400-digits", "5000-digits", "utf8-bom", "utf16"])
def test_the_gateways_quick_parse_accepts_and_refuses_what_the_exact_one_does(raw):
    """The gateway reads a body with orjson where it can (sglang_gw/errors.py parse_json_to_read): it gives the
    same value as the exact parse, or the same 400."""
    def outcome(parse):
        try:
            return "ok", json.dumps(parse(raw))  # NaN renders as NaN: comparable
        except APIError as exc:
            return exc.status, exc.code, exc.message
    assert outcome(parse_json_to_read) == outcome(parse_json)


def test_nesting_up_to_the_cap_is_accepted(url):
    """An ignored top-level field nested to the cap (with the body's own level) is fine; one more is refused."""
    ok = dict(completion(), extra=json.loads(nested(MAX_JSON_DEPTH - 1)))
    status, out = post(url, COMPLETIONS, ok)
    assert status == 200, out
    status, out = post(url, COMPLETIONS, dict(completion(), extra=json.loads(nested(MAX_JSON_DEPTH))))
    assert_refused(status, out, None, "invalid_json")


def test_the_heaviest_request_allowed_runs(url):
    """prompts × n up to the engine's capacity is admitted on an idle engine."""
    status, out = post(url, COMPLETIONS, completion(prompt=["a", "b"], n=CAPACITY // 2, max_tokens=1))
    assert status == 200, out
    assert len(out["choices"]) == CAPACITY


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_an_odd_method_is_a_405_with_an_openai_body(url, method):
    status, out = send(url, CHAT, b"", method)
    assert status == 405
    assert_openai_error(status, out)


def test_admission_counts_sequences_not_requests(engines):
    """A request that fits the engine's capacity, but not beside the sequences already admitted, is a 503
    queue_full; the same request is admitted once they are done."""
    url = engines[1].url
    held_n = CAPACITY // 2
    long = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True, "n": held_n}

    async def go():
        async with aiohttp.ClientSession() as session:
            held = await session.post(url + GENERATE, json={"text": "hi", "stream": True, "sampling_params": long})
            try:
                assert held.status == 200
                async for line in held.content:  # admitted and running
                    if sse_event(line) is not None:
                        break
                async with session.post(url + COMPLETIONS, json=completion(n=held_n + 1)) as resp:
                    out = await resp.json()
                    assert resp.status == 503 and out["error"]["code"] == "queue_full", out
                    assert int(resp.headers["Retry-After"]) >= 1
            finally:
                held.close()
            deadline = time.monotonic() + 30
            while True:  # the aborted sequences leave the engine
                async with session.post(url + COMPLETIONS, json=completion(n=held_n + 1)) as resp:
                    if resp.status == 200:
                        return
                    assert resp.status == 503 and time.monotonic() < deadline, await resp.text()
                await asyncio.sleep(0.1)

    asyncio.run(go())


# ---- the fuzz: malformed bodies of every shape through the gateway ------------------------------------

HUGE_INTS = st.sampled_from([-1, -(2**63) - 1, 2**31, 2**63, 2**64, 10**30, 10**300, 100_000])
JUNK = st.one_of(
    st.none(), st.booleans(), HUGE_INTS, st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 600), st.text(max_size=3), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
)


def body_strategies(hostile: bool) -> dict[str, st.SearchStrategy]:
    """Per path, bodies whose fields hold values a client could mean; `hostile`: or junk of any type or size."""

    def field(valid: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(valid, valid, JUNK) if hostile else valid

    text = st.text(max_size=12)  # any code point, lone surrogates included
    ids = st.lists(st.integers(0, 600 if hostile else 400), min_size=1, max_size=6)  # the vocabulary: 512
    small_n = st.integers(1, 3)
    sampling = {
        "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0.01, 1)), "top_k": field(st.sampled_from([-1, 1, 5, 50])),
        "min_p": field(st.floats(0, 1)), "presence_penalty": field(st.floats(-2, 2)),
        "frequency_penalty": field(st.floats(-2, 2)), "repetition_penalty": field(st.floats(0.5, 2)),
        "stop": field(st.one_of(st.text(min_size=1, max_size=4), st.lists(text, max_size=20))), "stop_token_ids": field(ids),
        "logit_bias": field(st.dictionaries(st.integers(0, 400).map(str), st.floats(-100, 100), max_size=3)),
        "ignore_eos": field(st.booleans()), "regex": field(st.sampled_from(["[ab]{1,3}", "(", "a*"])),
        "json_schema": field(st.sampled_from(['{"type": "string"}', "{", '{"type": "nope"}'])),
    }
    openai = {
        "n": field(small_n), "stream": field(st.booleans()), "seed": field(st.integers(0, 2**63 - 1)),
        "min_tokens": field(st.integers(0, 2)), "stop_regex": field(st.lists(st.sampled_from(["x", "[", "y+"]), max_size=3)),
        "response_format": field(st.sampled_from([{"type": "json_object"}, {"type": "json_schema"}, {"type": "text"}])),
        "stream_options": field(st.just({"include_usage": True})), **sampling,
    }
    message = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"])),
                                     "content": field(st.one_of(text, st.lists(st.fixed_dictionaries(
                                         {"type": field(st.just("text")), "text": field(text)}), max_size=2)))})
    return {
        CHAT: st.fixed_dictionaries({"model": field(st.just(MODEL)), "messages": field(st.lists(message, max_size=3))},
                                    optional={**openai, "max_tokens": field(st.integers(0, 3)),
                                              "max_completion_tokens": field(st.integers(0, 3)),
                                              "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 5)),
                                              "tools": field(st.just([{"type": "function", "function": {"name": "f"}}])),
                                              "tool_choice": field(st.sampled_from(["none", "auto", "required"]))}),
        COMPLETIONS: st.fixed_dictionaries({"model": field(st.just(MODEL)),
                                            "prompt": field(st.one_of(text, ids, st.lists(text, max_size=3)))},
                                           optional={**openai, "max_tokens": field(st.integers(0, 3)),
                                                     "logprobs": field(st.integers(0, 5)), "echo": field(st.booleans())}),
        GENERATE: st.fixed_dictionaries({}, optional={
            "text": field(st.one_of(text, st.lists(text, max_size=3))),
            "input_ids": field(st.one_of(ids, st.lists(ids, max_size=2))),
            "sampling_params": field(st.fixed_dictionaries({}, optional={
                **sampling, "max_new_tokens": field(st.integers(0, 3)), "n": field(small_n),
                "sampling_seed": field(st.integers(0, 100)), "stop_regex": field(st.just(["x"]))})),
            "stream": field(st.booleans()), "return_logprob": field(st.booleans()),
            "logprob_start_len": field(st.integers(-1, 2)), "top_logprobs_num": field(st.integers(0, 5)),
            "rid": field(text)}),
    }


BODIES = {hostile: body_strategies(hostile) for hostile in (False, True)}

# Generation stays cheap whatever the fuzz picks: a valid-looking request gets a small token limit.
LIMIT_FIELD = {CHAT: "max_tokens", COMPLETIONS: "max_tokens"}


def cheap(path: str, body: dict) -> dict:
    """Left out or null, the token limit would be the model's context (chat) or 128 (native)."""
    if path in LIMIT_FIELD:
        if body.get(LIMIT_FIELD[path]) is None:
            body[LIMIT_FIELD[path]] = 2
    elif body.get("sampling_params") is None:
        body["sampling_params"] = {"max_new_tokens": 2}
    elif isinstance(body["sampling_params"], dict) and body["sampling_params"].get("max_new_tokens") is None:
        body["sampling_params"]["max_new_tokens"] = 2
    return body


def encoded(path: str, body: dict) -> bytes:
    return json.dumps(cheap(path, body)).encode()  # NaN and Infinity as Python writes them


@st.composite
def requests(draw) -> tuple[str, str, bytes]:
    """(method, path, body bytes): well-formed JSON with sane or hostile fields, broken JSON, deep nesting, odd
    methods."""
    path = draw(st.sampled_from([CHAT, COMPLETIONS, GENERATE]))
    shape = draw(st.sampled_from(["valid"] * 3 + ["hostile"] * 4 + ["truncated", "deep", "not-an-object", "bytes",
                                                                      "method"]))
    body = encoded(path, draw(BODIES[shape != "valid"][path]))
    if shape == "truncated":
        body = body[:draw(st.integers(0, max(len(body) - 1, 0)))]
    elif shape == "deep":
        depth = draw(st.integers(MAX_JSON_DEPTH - 2, 3000))
        body = body[:-1] + b', "x": ' + nested(depth).encode() + b"}"
    elif shape == "not-an-object":
        body = json.dumps(draw(JUNK)).encode()
    elif shape == "bytes":
        body = draw(st.binary(max_size=64))
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"])) if shape == "method" else "POST"
    return method, path, body


FUZZ_EXAMPLES = 2000  # ~30 s on 2 CPU cores


def test_fuzzed_requests_through_the_gateway_never_get_a_5xx_nor_hurt_an_engine(engines, gateway):
    pids = [e.proc.pid for e in engines]
    statuses: dict[int, int] = {}
    started = time.monotonic()

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def fuzz(request):
        method, path, data = request
        status, out = send(gateway, path, data, method)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (method, path, data[:300], out)
        if status >= 400:
            assert_openai_error(status, out)

    fuzz()
    seconds = time.monotonic() - started
    print(f"\nfuzz: {sum(statuses.values())} requests in {seconds:.1f} s, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # both kinds were exercised
    assert [e.proc.poll() for e in engines] == [None, None] and [e.proc.pid for e in engines] == pids
    for engine in engines:
        status, out = post(engine.url, COMPLETIONS, completion())
        assert status == 200, out
    status, out = post(gateway, CHAT, chat())
    assert status == 200 and out["choices"][0]["message"]["content"] is not None, out
