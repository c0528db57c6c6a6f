"""SGLang's frontend language — the real `sglang` package's `RuntimeEndpoint` — against the gateway in
front of two engines, with an API key: what a user's `@sgl.function` programs do through it.

Constrained generation (`regex=`, `json_schema=`, `dtype=`) needs the engine's structured output; every
`gen` also sends `stop_regex`, which the engine must accept.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

sgl = pytest.importorskip("sglang")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import engine_fleet  # noqa: E402
from sglang_gw.gateway.auth import new_key  # noqa: E402
from sglang_gw.testing import http_json  # noqa: E402
from test_gateway import _start_gateway  # noqa: E402

MODEL = "tiny"
KEY, KEY_HASH = new_key()
# Long enough to span several of the gateway's routing blocks (64 bytes by default), as real system prompts do.
SYSTEM = ("You are a careful assistant for a travel agency. You answer questions about cities, trains and "
          "hotels in one short sentence, and you never invent prices or timetables that you do not know.")


@pytest.fixture(scope="module")
def engines(tiny_models):
    with engine_fleet(2, str(tiny_models["llama"]), "--served-model-name", MODEL,
                      "--max-total-tokens", "20000") as engines:
        yield engines


@pytest.fixture(scope="module")
def gateway(engines, tmp_path_factory):
    """The default routing policy (prefix_affinity), keys required."""
    yield from _start_gateway(engines, tmp_path_factory.mktemp("frontend"),
                              auth={"keys": [{"name": "frontend", "hash": KEY_HASH}]})


@pytest.fixture(scope="module")
def backend(gateway):
    return sgl.RuntimeEndpoint(gateway, api_key=KEY)


def engine_counters(engine) -> dict[str, float]:
    """The engine's own request and prompt-token counters (its /metrics)."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = {"sglang:num_requests_total", "sglang:cached_tokens_total", "sglang:prompt_tokens_total"}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in wanted}


def counters_delta(engines, before: list[dict]) -> list[dict]:
    return [{k: v - b[k] for k, v in engine_counters(e).items()} for e, b in zip(engines, before)]


# ---- programs ------------------------------------------------------------------------------------


@sgl.function
def trip_planner(s, city):
    """Roles, gen, select and fork: the calls of one program share its growing text."""
    s += sgl.system(SYSTEM)
    s += sgl.user(f"I want to visit {city}. What should I see first?")
    s += sgl.assistant(sgl.gen("first", max_tokens=12, ignore_eos=True))
    s += sgl.user("Should I take the train?")
    s += sgl.assistant(sgl.select("train", choices=["yes", "no", "it depends"]))
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += sgl.user(f"Give me tip number {i + 1}.")
        f += sgl.assistant(sgl.gen("tip", max_tokens=8, ignore_eos=True))
    s += sgl.user("Thanks, summarise.")
    s += sgl.assistant(sgl.gen("summary", max_tokens=8, ignore_eos=True))
    return [f["tip"] for f in forks]


@sgl.function
def year(s):
    s += "The Eiffel Tower was finished in the year "
    s += sgl.gen("year", max_tokens=8, regex=r"(18|19|20)[0-9]{2}")


PLACE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "capital"],
                "properties": {"city": {"enum": ["Paris", "Berlin", "Rome"]}, "capital": {"type": "boolean"}}}


@sgl.function
def place(s):
    s += "A city as JSON: "
    s += sgl.gen("place", max_tokens=64, json_schema=json.dumps(PLACE_SCHEMA))


@sgl.function
def count(s):
    s += "How many legs has a spider? "
    s += sgl.gen("legs", max_tokens=8, dtype=int)


@sgl.function
def short_answer(s, question):
    s += sgl.system(SYSTEM)
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=10, ignore_eos=True))


# ---- tests ---------------------------------------------------------------------------------------


def test_runtime_endpoint_connects_with_the_key(backend, gateway, engines):
    assert backend.model_info == http_json(engines[0].url + "/get_model_info")[1]
    assert backend.get_chat_template().name == "default"
    info = backend.get_server_info()
    assert info["model_path"] == backend.get_model_name() and len(info["workers"]) == 2
    with pytest.raises(RuntimeError, match="invalid_api_key"):
        sgl.RuntimeEndpoint(gateway, api_key="sk-gw-wrong")


def test_a_programs_calls_are_served_by_one_engine(backend, engines):
    before = [engine_counters(e) for e in engines]
    state = trip_planner.run(city="Lyon", backend=backend, temperature=0)
    assert state["train"] in ("yes", "no", "it depends")
    assert len(state.ret_value) == 2 and state["first"] and state["summary"]
    assert state.text().startswith("SYSTEM:" + SYSTEM) and "ASSISTANT:" in state.text()
    # 8 engine requests: the first gen; select's prefix-caching call and its batch of 3 choices; 2 tips; the summary.
    delta = counters_delta(engines, before)
    served = [d["sglang:num_requests_total"] for d in delta]
    assert sorted(served) == [0, 8], served
    home = delta[served.index(8)]
    assert home["sglang:cached_tokens_total"] > home["sglang:prompt_tokens_total"] / 2
    # The later calls found the program's text in that engine's cache.
    assert state.get_meta_info("summary")["cached_tokens"] > state.get_meta_info("summary")["prompt_tokens"] / 2


def test_run_batch(backend):
    questions = ["Where is Lyon?", "Where is Turin?", "Where is Ghent?", "Where is Porto?"]
    states = short_answer.run_batch([{"question": q} for q in questions], backend=backend, temperature=0)
    for q, state in zip(questions, states):
        assert f"USER:{q}\n" in state.text() and state["answer"]
        assert state.get_meta_info("answer")["completion_tokens"] == 10


def test_streaming(backend):
    state = short_answer.run(question="Where is Lyon?", backend=backend, stream=True, temperature=0)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text() and len(pieces) > 2
    whole = short_answer.run(question="Where is Lyon?", backend=backend, temperature=0)
    assert state["answer"] == whole["answer"]


def test_flush_cache_empties_both_engines(backend, engines):
    prompt = {"text": "SYSTEM:" + SYSTEM, "sampling_params": {"max_new_tokens": 0}}
    for engine in engines:  # both hold the system prompt now
        http_json(engine.url + "/generate", json.dumps(prompt).encode())
    backend.flush_cache()
    for engine in engines:
        status, out = http_json(engine.url + "/generate", json.dumps(prompt).encode())
        assert status == 200 and out["meta_info"]["cached_tokens"] == 0


def test_gen_with_regex(backend):
    value = year.run(backend=backend, temperature=0)["year"]
    assert re.fullmatch(r"(18|19|20)[0-9]{2}", value), value


def test_gen_with_json_schema(backend):
    jsonschema = pytest.importorskip("jsonschema")
    value = place.run(backend=backend, temperature=0)["place"]
    jsonschema.validate(json.loads(value), PLACE_SCHEMA)


def test_gen_with_dtype_int(backend):
    value = count.run(backend=backend, temperature=0)["legs"]
    assert re.fullmatch(r"[-+]?[0-9]+", value.strip()), value



@pytest.mark.slow
def test_chatml_is_the_frontend_template_that_renders_like_the_embedded_model(smollm2_dir):
    """docs/sglang-api.md tells users of the embedded model to pass chat_template_name="chatml": for a
    program that starts with a system message, the frontend's text is the engine's own rendering."""
    from sglang.lang.chat_template import get_chat_template

    from sglang_gw.gateway.chat_template import load_chat_template

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where to?"},
                {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "Why?"}]
    chatml = get_chat_template("chatml")
    frontend = chatml.get_prompt(messages) + chatml.get_prefix_and_suffix("assistant", messages)[0]
    assert frontend == load_chat_template(smollm2_dir).render(messages)
    # What the frontend would pick by itself from the model path: not the model's format.
    info_path = str(smollm2_dir)
    from sglang.lang.chat_template import get_chat_template_by_model_path
    assert get_chat_template_by_model_path(info_path).name == "default"
