"""Constrained output on real engine processes: regexes and JSON schemas sampled at temperature 1.0
through /generate, /v1/completions and /v1/chat/completions (streamed and not, n > 1), on the tiny
512-token vocabulary and on a Qwen-style 151k one; invalid grammars; the OpenAI SDK's structured-output
helper and forced tool calls; stop_regex, EBNF, and grammar state through retraction.

Random weights make the model a random walk inside the grammar: every completed output must match,
and an output cut by max_tokens must say finish_reason "length"."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import openai
import pydantic
import pytest

from conftest import EngineProcess, http_json
from sglang_gw.engine import Engine, SamplingParams
from sglang_gw.engine.sampling_params import InvalidParamError
from sglang_gw.testing import sse_event, DONE

# The e-commerce support answer of SGLang's own examples.
ORDER_REGEX = (r'\{"status": "(shipped|processing|cancelled)", "tracking_number": "[A-Z0-9]{8,12}", '
               r'"estimated_delivery": "20[0-9]{2}-[01][0-9]-[0-3][0-9]", "suggested_reply": "[A-Za-z ,.!]{1,40}"\}')
REGEXES = [
    ORDER_REGEX,
    r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",  # an IPv4 address
    r"(yes|no|maybe)",
    r"[a-z]{2,6}( [a-z]{2,6}){1,4}\.",
]
SCHEMAS = [
    {  # nested objects, arrays, enums, pattern, integer bounds, maxLength, optional properties,
        # anyOf with null, additionalProperties: false
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 12},
                "tier": {"enum": ["gold", "silver", "bronze"]},
            }, "required": ["name", "tier"], "additionalProperties": False},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 8},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 100}},
                "required": ["sku", "qty"], "additionalProperties": False}},
            "gift_note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
            "express": {"type": "boolean"},
        },
        "required": ["order_id", "customer", "items", "gift_note"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "label": {"enum": ["pos", "neg", "neutral"]}},
     "required": ["score", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
]
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def server(tiny_models):
    with EngineProcess(str(tiny_models["llama"]), "--served-model-name", "tiny", "--max-total-tokens", "20000",
                       threads=2) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def post(server, path: str, body: dict) -> tuple[int, object]:
    return http_json(server.url + path, json.dumps(body).encode(), timeout=120)


def stream_events(server, path: str, body: dict) -> list[dict]:
    import urllib.request

    request = urllib.request.Request(server.url + path, data=json.dumps(dict(body, stream=True)).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        events = [sse_event(line) for line in resp]
    events = [e for e in events if e is not None]
    assert events[-1] == DONE
    return events[:-1]


def outputs_of(server, path: str, body: dict, stream: bool) -> list[tuple[str, str]]:
    """(text, finish_reason) of every output of a request, whichever endpoint and mode."""
    if path == "/generate":
        if stream:
            final: dict[int, dict] = {}
            for event in stream_events(server, path, body):
                final[event.get("index", 0)] = event
            items = list(final.values())
        else:
            status, items = post(server, path, body)
            assert status == 200, items
            items = items if isinstance(items, list) else [items]
        return [(i["text"], i["meta_info"]["finish_reason"]["type"]) for i in items]
    chat = path == "/v1/chat/completions"
    if stream:
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        for event in stream_events(server, path, body):
            for choice in event["choices"]:
                piece = choice["delta"].get("content") if chat else choice["text"]
                texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
                if choice["finish_reason"]:
                    reasons[choice["index"]] = choice["finish_reason"]
        return [(texts[i], reasons[i]) for i in sorted(texts)]
    status, data = post(server, path, body)
    assert status == 200, data
    return [((c["message"]["content"] if chat else c["text"]), c["finish_reason"]) for c in data["choices"]]


def request_body(path: str, constraint: dict, seed: int, n: int, max_tokens: int) -> dict:
    """One request of `path` for a constraint given as SGLang sampling fields ({"regex": ...} etc.)."""
    if path == "/generate":
        return {"text": "Answer: ", "sampling_params": {**constraint, "temperature": 1.0, "sampling_seed": seed,
                                                         "n": n, "max_new_tokens": max_tokens}}
    body = {"model": "tiny", "temperature": 1.0, "seed": seed, "n": n, "max_tokens": max_tokens, **constraint}
    if path == "/v1/chat/completions":
        return dict(body, messages=[{"role": "user", "content": "Answer in the required format."}])
    return dict(body, prompt="Answer: ")


MODES = [("/generate", False), ("/generate", True), ("/v1/completions", False), ("/v1/completions", True),
         ("/v1/chat/completions", False), ("/v1/chat/completions", True)]


def check_all(server, constraint: dict, valid, max_tokens: int = 160) -> int:
    """Every completed output of every endpoint and mode is valid; returns how many completed."""
    completed = 0
    for path, stream in MODES:
        for seed in SEEDS:
            for text, reason in outputs_of(server, path, request_body(path, constraint, seed, 2, max_tokens), stream):
                assert reason in ("stop", "length"), reason
                if reason == "stop":
                    assert valid(text), f"{path} stream={stream} seed={seed}: {text!r}"
                    completed += 1
    return completed


@pytest.mark.parametrize("regex", REGEXES)
def test_every_completed_output_matches_the_regex(server, regex):
    completed = check_all(server, {"regex": regex}, lambda text: re.fullmatch(regex, text))
    assert completed >= len(MODES) * len(SEEDS)  # most of the 36 outputs complete; all that do match


@pytest.mark.parametrize("schema", SCHEMAS, ids=["order", "enum-int", "array"])
def test_every_completed_output_matches_the_json_schema(server, schema):
    def valid(text):
        jsonschema.validate(json.loads(text), schema)
        return True

    completed = check_all(server, {"json_schema": json.dumps(schema)}, valid, max_tokens=200)
    assert completed >= len(MODES) * len(SEEDS)


def test_openai_response_format_json_schema_and_json_object(server):
    schema = SCHEMAS[1]
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = request_body(path, {"response_format": {"type": "json_schema", "json_schema": {
            "name": "rating", "schema": schema, "strict": True}}}, seed=5, n=3, max_tokens=60)
        for text, reason in outputs_of(server, path, body, stream=False):
            assert reason == "stop"
            jsonschema.validate(json.loads(text), schema)
        body = request_body(path, {"response_format": {"type": "json_object"}}, seed=5, n=2, max_tokens=300)
        for text, reason in outputs_of(server, path, body, stream=True):
            if reason == "stop":
                assert isinstance(json.loads(text), dict)


def test_output_cut_by_max_tokens_is_length_never_stop(server):
    for path, stream in MODES:
        body = request_body(path, {"regex": ORDER_REGEX}, seed=7, n=2, max_tokens=12)
        for text, reason in outputs_of(server, path, body, stream):
            assert reason == "length" and not re.fullmatch(ORDER_REGEX, text)


@pytest.mark.parametrize("body, param", [
    ({"text": "x", "sampling_params": {"regex": "(unclosed"}}, "regex"),
    ({"text": "x", "sampling_params": {"json_schema": "{not json"}}, "json_schema"),
    ({"text": "x", "sampling_params": {"json_schema": json.dumps({"type": "object", "uniqueItems": True})}},
     "json_schema"),
    ({"text": "x", "sampling_params": {"json_schema": json.dumps({"type": "strnig"})}}, "json_schema"),
    ({"text": "x", "sampling_params": {"ebnf": "root ::= missing_rule"}}, "ebnf"),
    ({"text": "x", "sampling_params": {"stop_regex": "a)"}}, "stop_regex"),
    ({"model": "tiny", "prompt": "x", "regex": "[z-a]"}, "regex"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                          "minProperties": "a"}}}},
     "response_format.json_schema.schema"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format.type"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                "properties": {"a": {"type": 7}}}}}]},
     "tools"),
])
def test_invalid_grammar_is_a_400_naming_the_field_and_the_engine_keeps_serving(server, body, param):
    path = "/generate" if "text" in body else ("/v1/chat/completions" if "messages" in body else "/v1/completions")
    status, error = post(server, path, body)
    assert status == 400, error
    assert error["error"]["param"].startswith(param), error
    status, ok = post(server, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and ok["meta_info"]["completion_tokens"] == 2


def test_stop_regex_ends_the_output_at_the_first_match_keeping_it(server):
    body = {"text": "Answer: ", "sampling_params": {"regex": "[a-c]{5,40}", "stop_regex": ["ab+c"],
                                                     "temperature": 1.0, "max_new_tokens": 60}}
    stopped = 0
    for seed in range(24):
        body["sampling_params"]["sampling_seed"] = seed
        status, out = post(server, "/generate", body)
        assert status == 200
        reason = out["meta_info"]["finish_reason"]
        if reason.get("matched") == "ab+c":
            stopped += 1
            match = re.search("ab+c", out["text"])
            assert match and match.end() == len(out["text"])  # the text ends with its first match
    assert stopped > 0


def test_ebnf_grammar(server):
    grammar = 'root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z]{2,8}'
    for seed in SEEDS:
        status, out = post(server, "/generate", {"text": "x", "sampling_params": {
            "ebnf": grammar, "temperature": 1.0, "sampling_seed": seed, "max_new_tokens": 30}})
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(r"(hello|hi) [a-z]{2,8}", out["text"]), out["text"]


def test_logprobs_and_stop_strings_with_a_grammar(server):
    status, out = post(server, "/generate", {"text": "x", "return_logprob": True, "top_logprobs_num": 2,
                                             "sampling_params": {"regex": ORDER_REGEX, "temperature": 1.0,
                                                                 "sampling_seed": 3, "max_new_tokens": 120}})
    assert status == 200
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]  # every token sampled and scored
    status, out = post(server, "/generate", {"text": "x", "sampling_params": {
        "regex": ORDER_REGEX, "stop": ['"tracking_number"'], "temperature": 1.0, "max_new_tokens": 120}})
    assert out["text"].startswith('{"status": "') and out["text"].endswith(", ")
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": '"tracking_number"'}


# ---- the OpenAI SDK: structured-output helper and forced tool calls -------------------------------


class Rating(pydantic.BaseModel):
    score: int = pydantic.Field(ge=-5, le=5)
    label: str = pydantic.Field(pattern="^(pos|neg|neutral)$")


def test_sdk_parse_returns_a_parsed_pydantic_object(client):
    completion = client.chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Rate this."}], response_format=Rating,
        temperature=1.0, seed=4, max_tokens=100)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Rating) and -5 <= message.parsed.score <= 5


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]


def _check_call(call) -> None:
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), params)
    assert call.id.startswith("call_") and call.type == "function"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_come_back_as_tool_calls(client, tool_choice):
    messages = [{"role": "user", "content": "What time is it?"}]
    # One call per answer: a random model would otherwise keep appending calls up to max_tokens.
    options = dict(model="tiny", messages=messages, tools=TOOLS, tool_choice=tool_choice, temperature=1.0,
                   max_tokens=120, parallel_tool_calls=False)
    for seed in SEEDS:
        completion = client.chat.completions.create(seed=seed, **options)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            _check_call(call)
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_time"
        # The stream carries the same calls (the SDK's accumulator assembles them).
        with client.chat.completions.stream(seed=seed, **options) as stream:
            final = stream.get_final_completion()
        streamed = final.choices[0]
        assert streamed.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
            [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_a_tool_conversation_round_trips(client):
    """An assistant's earlier tool call and the tool's answer are accepted as history."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    completion = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                                max_tokens=5)
    assert completion.choices[0].message.content is not None


# ---- a large vocabulary ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_server(qwen_vocab_model):
    with EngineProcess(str(qwen_vocab_model), "--served-model-name", "tiny", "--max-total-tokens", "8000",
                       threads=2) as server:
        yield server


def test_a_151k_vocabulary_keeps_every_completed_output_valid(qwen_server):
    def valid_json(text):
        jsonschema.validate(json.loads(text), SCHEMAS[0])
        return True

    completed = check_all(qwen_server, {"regex": ORDER_REGEX}, lambda text: re.fullmatch(ORDER_REGEX, text))
    completed += check_all(qwen_server, {"json_schema": json.dumps(SCHEMAS[0])}, valid_json, max_tokens=200)
    assert completed >= len(MODES) * len(SEEDS)


# ---- grammar state in the scheduler ---------------------------------------------------------------


@pytest.mark.parametrize("jump_forward", [True, False])
def test_grammar_state_survives_retraction_and_n_samples(tiny_models, jump_forward):
    """A pool of about one request's KV for 24 sequences forces retractions; each sequence's grammar
    state follows it."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randint(8, 48))] for _ in range(12)]
    params = SamplingParams(max_new_tokens=200, temperature=1.0, sampling_seed=11, n=2, regex=ORDER_REGEX)
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=200, chunked_prefill_size=64,
                disable_jump_forward=not jump_forward) as engine:
        outs = engine.generate(prompts, params)
        assert engine.scheduler.stats.retractions > 0
        assert (engine.scheduler.stats.forced_tokens > 0) == jump_forward
        assert len(outs) == 24 and all(out.finish_reason.type == "stop" for out in outs)
        for out in outs:
            assert re.fullmatch(ORDER_REGEX, out.text), out.text
        engine.check_integrity()


def test_jump_forward_emits_forced_runs_and_keeps_outputs_identical(tiny_models):
    """Greedy outputs are the same with and without jump-forward; with it, forced tokens skip sampling."""
    prompts = ["first order", "second order"]
    params = SamplingParams(max_new_tokens=90, temperature=0, regex=ORDER_REGEX)
    results = {}
    for off in (False, True):
        with Engine(model=str(tiny_models["llama"]), max_total_tokens=4000, disable_jump_forward=off) as engine:
            results[off] = [out.text for out in engine.generate(prompts, params)]
            forced = engine.scheduler.stats.forced_tokens
            assert (forced == 0) if off else (forced >= 10)
            engine.check_integrity()
    assert results[False] == results[True]


@pytest.mark.parametrize("regex, max_new_tokens, reason", [("hello world", 30, "stop"),
                                                           ('\\{"status": "(on|off)"\\}', 3, "length")])
def test_an_output_the_grammar_forces_whole_finishes_without_a_step(tiny_models, regex, max_new_tokens, reason):
    """The grammar's forced opening covers the whole output (or max_new_tokens): the request finishes as it
    is admitted, and its answer still arrives."""
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=2000) as engine:
        out = engine.generate("x", SamplingParams(max_new_tokens=max_new_tokens, regex=regex))[0]
        assert out.finish_reason.type == reason
        assert out.text == regex if reason == "stop" else len(out.output_ids) == max_new_tokens
        assert engine.scheduler.stats.forward_tokens == 0
        engine.check_integrity()


def test_grammar_backend_none_refuses_constrained_requests(tiny_models):
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=2000, grammar_backend="none") as engine:
        with pytest.raises(InvalidParamError) as err:
            engine.prepare("x", SamplingParams(json_schema='{"type": "object"}'), grammar_field="response_format")
        assert (err.value.param, err.value.code) == ("response_format", "unsupported")
        assert engine.generate("x", SamplingParams(max_new_tokens=3))[0].completion_tokens == 3
