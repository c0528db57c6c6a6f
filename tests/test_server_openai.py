"""The OpenAI-compatible API over HTTP, driven with the official `openai` SDK against real engine
processes: the shared tiny random-weight Llama (`tiny_server`), an API-key server, and SmolLM2."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest
from conftest import EngineProcess
from transformers import AutoTokenizer

NO_EOS = {"ignore_eos": True}


def make_client(server, key: str = "x", cls=openai.OpenAI):
    return cls(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(tiny_server):
    return make_client(tiny_server)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def chat(client, content: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def complete(client, prompt, **kw):
    return client.completions.create(model="tiny", prompt=prompt, **kw)


def join_stream(chunks) -> tuple[dict[int, str], dict[int, str]]:
    """Per choice index: the joined text and the finish_reason (which must come on its last chunk)."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finish, "a chunk after the choice's finish_reason"
            delta = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (delta or "")
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return texts, finish


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- shapes: non-stream vs stream ------------------------------------------------------------------


def test_chat_stream_matches_non_stream(client):
    kw = dict(temperature=0, max_tokens=12, extra_body=NO_EOS)
    full = chat(client, "Tell me about the quick brown fox.", **kw)
    assert full.object == "chat.completion" and full.model == "tiny"
    [choice] = full.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content and full.usage.completion_tokens == 12

    chunks = list(chat(client, "Tell me about the quick brown fox.", stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    texts, finish = join_stream(chunks)
    assert texts == {0: choice.message.content}
    assert finish == {0: "length"} and chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("prompt", ["Radix attention reuses", ["Continuous batching lets", "def add(a, b):"]],
                         ids=["one", "two"])
def test_completions_stream_matches_non_stream(client, prompt):
    kw = dict(temperature=0, max_tokens=10, extra_body=NO_EOS)
    full = complete(client, prompt, **kw)
    count = len(prompt) if isinstance(prompt, list) else 1
    assert full.object == "text_completion"
    assert [c.index for c in full.choices] == list(range(count))
    assert all(c.text and c.finish_reason == "length" for c in full.choices)
    assert full.usage.completion_tokens == 10 * count
    if count == 2:  # each prompt got its own continuation, in prompt order
        assert [c.text for c in full.choices] == [complete(client, p, **kw).choices[0].text for p in prompt]

    texts, finish = join_stream(complete(client, prompt, stream=True, **kw))
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {i: "length" for i in range(count)}


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


# ---- usage ----------------------------------------------------------------------------------------


def test_usage_counts_and_cached_tokens(client, tokenizer):
    content = "Usage check: " + "".join(f"item {i} of the long prompt; " for i in range(10))[:190]
    assert len(content) >= 200
    messages = [{"role": "user", "content": content}]
    expected_prompt = len(tokenizer.encode(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False))
    usages = [chat(client, content, temperature=0, max_tokens=4, extra_body=NO_EOS).usage for _ in range(2)]
    for usage in usages:
        assert (usage.prompt_tokens, usage.completion_tokens) == (expected_prompt, 4)
        assert usage.total_tokens == expected_prompt + 4
    assert usages[1].prompt_tokens_details.cached_tokens >= expected_prompt - 1

    text_usage = complete(client, "The lazy dog sleeps", max_tokens=3, extra_body=NO_EOS).usage
    assert text_usage.prompt_tokens == len(tokenizer.encode("The lazy dog sleeps"))


# ---- sampling parameters --------------------------------------------------------------------------


def test_n_samples_with_seed(client):
    kw = dict(n=2, temperature=1, seed=11, max_tokens=8, extra_body=NO_EOS)
    first = chat(client, "Sample twice, please.", **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.choices[0].message.content != first.choices[1].message.content  # seeds 11 and 12
    assert first.usage.completion_tokens == 16
    texts, finish = join_stream(chat(client, "Sample twice, please.", stream=True, **kw))
    assert texts == {c.index: c.message.content for c in first.choices}
    assert finish == {0: "length", 1: "length"}


def test_choice_index_is_prompt_index_times_n_plus_sample_index(client):
    prompts = ["Two prompts, the first", "Two prompts, the second"]
    kw = dict(temperature=1, max_tokens=6, extra_body=NO_EOS)
    # Sample k of a prompt is seeded seed + k, so it reads the same as that prompt alone with that seed.
    alone = {2 * j + k: complete(client, p, seed=21 + k, **kw).choices[0].text
             for j, p in enumerate(prompts) for k in range(2)}
    out = complete(client, prompts, n=2, seed=21, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert {c.index: c.text for c in out.choices} == alone
    texts, finish = join_stream(complete(client, prompts, n=2, seed=21, stream=True, **kw))
    assert (texts, finish) == (alone, {i: "length" for i in range(4)})


def test_seed_reproducible(client):
    def sample(seed):
        return complete(client, "Héllo wörld", temperature=1, seed=seed, max_tokens=10, extra_body=NO_EOS).choices[0].text

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_stop_string_trims_and_stops(client, stream):
    prompt = "Paris is the capital of"
    greedy = complete(client, prompt, temperature=0, max_tokens=16, extra_body=NO_EOS).choices[0].text
    stop = greedy[6:9]
    assert len(stop) == 3
    expected = greedy[: greedy.index(stop)]
    out = complete(client, prompt, temperature=0, max_tokens=16, stop=[stop], stream=stream, extra_body=NO_EOS)
    if stream:
        texts, finish = join_stream(out)
        assert (texts, finish) == ({0: expected}, {0: "stop"})
    else:
        assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")


def test_max_tokens_and_max_completion_tokens(client):
    text = complete(client, "Berlin is", max_tokens=7, extra_body=NO_EOS)
    assert (text.usage.completion_tokens, text.choices[0].finish_reason) == (7, "length")
    chat_out = chat(client, "Count to ten.", max_completion_tokens=5, extra_body=NO_EOS)
    assert (chat_out.usage.completion_tokens, chat_out.choices[0].finish_reason) == (5, "length")


# ---- logprobs -------------------------------------------------------------------------------------


def test_chat_logprobs(client):
    out = chat(client, "Logprobs, please.", temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
               extra_body=NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the top-1
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0


def test_chat_logprobs_bytes_are_the_tokens_bytes(client, tokenizer):
    byte_e4 = tokenizer.convert_tokens_to_ids("\u00e4")  # byte-level BPE: the single byte 0xE4 (starts "你")
    out = chat(client, "One byte.", temperature=0, max_tokens=3, logprobs=True, logit_bias={str(byte_e4): 100},
               extra_body=NO_EOS)
    assert [e.bytes for e in out.choices[0].logprobs.content] == [[0xE4]] * 3


def test_completion_logprobs(client):
    out = complete(client, "The quick brown", temperature=0, max_tokens=5, logprobs=2, extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert n == 5 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token_logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(token_logprob)


def test_completion_stream_text_offset_matches_non_stream(client):
    kw = dict(temperature=0, max_tokens=6, logprobs=1, extra_body=NO_EOS)
    whole = complete(client, "The quick", **kw).choices[0].logprobs.text_offset
    chunks = complete(client, "The quick", stream=True, **kw)
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == whole


def test_stream_include_usage_and_logprobs(client):
    chunks = list(chat(client, "Stream with usage.", temperature=0, max_tokens=9, stream=True, logprobs=True,
                       top_logprobs=2, stream_options={"include_usage": True}, extra_body=NO_EOS))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert last.usage.completion_tokens == 9
    assert last.usage.total_tokens == last.usage.prompt_tokens + 9
    # Each generated token's logprob is sent exactly once across the chunks.
    assert sum(len(c.choices[0].logprobs.content) for c in chunks[:-1]) == 9


# ---- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model" and info.value.body["type"] == "not_found_error"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_invalid_temperature_is_bad_request(client, stream):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "hi", temperature=-1, stream=stream)
    error = info.value.response.json()["error"]
    assert error == info.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"
    assert error["code"] == "invalid_value"


def test_prompt_longer_than_context(client, tiny_server):
    status, model_info = get_json(tiny_server.url + "/get_model_info")
    assert status == 200 and model_info["context_length"] == 2048
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, [5] * 3000, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"


def test_tool_choice_auto_is_refused_naming_the_field(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "Call f.", tools=tools)
    assert info.value.body["param"] == "tool_choice" and "not supported" in info.value.body["message"]


# ---- API key --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tiny_models):
    with EngineProcess(str(tiny_models["llama"]), "--served-model-name", "tiny", "--api-key", "secret-key") as server:
        yield server


def test_api_key(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        make_client(keyed_server, key="wrong").models.list()
    good = make_client(keyed_server, key="secret-key")
    assert [m.id for m in good.models.list().data] == ["tiny"]
    assert complete(good, "hi", max_tokens=2, extra_body=NO_EOS).usage.completion_tokens == 2

    status, health = get_json(keyed_server.url + "/health")
    assert status == 200 and health["status"] == "ok"
    status, body = get_json(keyed_server.url + "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert get_json(keyed_server.url + "/v1/models", {"x-api-key": "secret-key"})[0] == 200


# ---- concurrency ----------------------------------------------------------------------------------


def test_concurrent_streams_match_non_stream(tiny_server):
    prompts = [f"Request {i}: the fox number {i * 7} jumps" for i in range(32)]
    kw = dict(model="tiny", temperature=0, max_tokens=16, extra_body=NO_EOS)

    async def run():
        aclient = make_client(tiny_server, cls=openai.AsyncOpenAI)

        async def stream(prompt):
            return join_stream([c async for c in await aclient.completions.create(prompt=prompt, stream=True, **kw)])

        async def whole(prompt):
            return (await aclient.completions.create(prompt=prompt, **kw)).choices[0].text

        try:
            streamed = await asyncio.gather(*(stream(p) for p in prompts))
            return streamed, await asyncio.gather(*(whole(p) for p in prompts))
        finally:
            await aclient.close()

    streamed, whole_texts = asyncio.run(run())
    assert [finish for _, finish in streamed] == [{0: "length"}] * 32
    assert [texts[0] for texts, _ in streamed] == whole_texts


# ---- a real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2_dir):
    with EngineProcess("builtin:smollm2-135m-instruct", "--served-model-name", "tiny", threads=2) as server:
        out = chat(make_client(server), "What is the capital of France?", temperature=0, max_tokens=20)
    assert "Paris" in out.choices[0].message.content
