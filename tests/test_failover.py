"""Issue 12, mid-stream failover: `kill -9` of an engine while 16 greedy streams and 16 non-streamed
requests run on it. Every one completes with 200 on the other engine, continued from the tokens the
client had: streams with no gap event, one id and correct usage; outputs equal to a run without the
kill. Real engine processes, a real gateway process, the official OpenAI SDK and /generate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import aiohttp
import openai
import pytest

from conftest import engine_fleet
from sglang_gw.gateway.auth import hash_key
from sglang_gw.errors import parse_json_to_read
from sglang_gw.gateway.failover import Progress
from sglang_gw.resume import RESUMABLE_HEADER, RESUME_FIELD
from sglang_gw.testing import DONE, http_json, sse_event
from test_gateway import _start_gateway

MODEL = "tiny"
ADMIN_KEY = "sk-gw-admin-failover"
MAX_TOKENS = 400
STREAMED_BEFORE_KILL = 12  # tokens every stream has when the engine is killed
CHECKPOINTED = 1.0  # seconds of generation before the kill: non-streamed answers are past their first checkpoint


@pytest.fixture(scope="module")
def engines(tiny_models):
    # float32: a continuation prefills what the first engine decoded, and the two paths' logits differ in the
    # last bits; at bfloat16 (auto, on a CPU with bf16 dot products) that moved a seeded sample of 1,200
    # now and then, and a continuation must give the same text.
    with engine_fleet(2, str(tiny_models["llama"]), "--served-model-name", MODEL, "--max-total-tokens", "30000",
                      "--dtype", "float32") as e:
        yield e


class Run:
    """One request of the mix, its answer, and when its stream's tokens arrived."""

    def __init__(self, i: int):
        self.i = i
        self.api = ("chat", "completions", "generate", "completions")[i % 4]
        self.stream = i % 2 == 0
        self.prompt = f"request {i}: " + " ".join(f"w{(i * 7 + k) % 50}" for k in range(12 + i % 5))
        self.text = ""
        self.ids: set[str] = set()  # every id the client saw (one expected)
        self.arrivals: list[float] = []  # when each chunk with new text arrived
        self.usage: int | None = None
        self.finish: str | None = None
        self.status = 200
        self.errors: list[str] = []


async def _run(client: openai.AsyncOpenAI, base: str, run: Run) -> Run:
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}
    if run.api == "generate":
        body = {"text": run.prompt, "stream": run.stream,
                "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}}
        async with aiohttp.ClientSession() as session, session.post(base + "/generate", json=body) as resp:
            run.status = resp.status
            if not run.stream:
                answer = await resp.json()
                run.text, run.ids, run.usage = answer["text"], {answer["meta_info"]["id"]}, \
                    answer["meta_info"]["completion_tokens"]
                return run
            async for line in resp.content:
                event = sse_event(line)
                if event is None or event == DONE:
                    continue
                if "error" in event:
                    run.errors.append(json.dumps(event))
                    continue
                if len(event["text"]) > len(run.text):
                    run.arrivals.append(time.monotonic())
                run.text = event["text"]
                run.ids.add(event["meta_info"]["id"])
                run.usage = event["meta_info"]["completion_tokens"]
        return run
    if run.api == "chat":
        create = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": run.prompt}],
                                                max_tokens=MAX_TOKENS, stream=run.stream,
                                                **({"stream_options": {"include_usage": True}} if run.stream else {}),
                                                **greedy)
    else:
        create = client.completions.create(model=MODEL, prompt=run.prompt, max_tokens=MAX_TOKENS, stream=run.stream,
                                           **({"stream_options": {"include_usage": True}} if run.stream else {}),
                                           **greedy)
    try:
        answer = await create
        if not run.stream:
            choice = answer.choices[0]
            run.text = choice.message.content if run.api == "chat" else choice.text
            run.ids, run.usage, run.finish = {answer.id}, answer.usage.completion_tokens, choice.finish_reason
            return run
        async for chunk in answer:
            run.ids.add(f"{chunk.id}@{chunk.created}")
            if chunk.usage is not None:
                run.usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                piece = choice.delta.content if run.api == "chat" else choice.text
                if piece:
                    run.arrivals.append(time.monotonic())
                    run.text += piece
                run.finish = choice.finish_reason or run.finish
    except openai.APIError as exc:
        run.errors.append(repr(exc))
        run.status = getattr(exc, "status_code", None) or 200
    return run


def progress_of(body: dict) -> Progress:
    """A request's Progress, its body as the client sent it."""
    return Progress(body, json.dumps(body).encode())


def test_relay_gives_whole_events_whatever_the_chunks():
    """The relay's framing: chunks cut anywhere give the same events, annotations read and stripped, other
    SSE comments passed on, an unterminated last event flushed as it is."""
    stream = (b': gw 0 0 5 6\ndata: {"a": 1}\n\n: keep-alive\n\n: gw 1. 0 7\ndata: {"b": 2}\n\n'
              b': gw usage\ndata: {"u": 3}\n\n: gw 0. 2 8\ndata: {"c": 4}')
    whole = progress_of({"stream": True})
    want = whole.feed(stream) + whole.flush()
    assert want == b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": 2}\n\ndata: {"u": 3}\n\ndata: {"c": 4}\n\n'
    assert whole.ids == {0: [5, 6, 8], 1: [7]} and whole.finished == {0, 1} and whole.continuable
    bytewise = progress_of({"stream": True})
    assert b"".join(bytewise.feed(stream[i:i + 1]) for i in range(len(stream))) + bytewise.flush() == want
    assert (bytewise.ids, bytewise.finished) == (whole.ids, whole.finished)


def test_a_continuation_is_made_from_the_body_as_sent_not_as_read():
    """The gateway reads a body with orjson, where an integer past 64 bits becomes a float; the next engine's
    body is made from the bytes the client sent, so such an integer reaches it as sent."""
    big = 123456789012345678901234567890
    raw = b'{"prompt": "a", "stream": true, "seed": %d}' % big
    body = parse_json_to_read(raw)
    assert body["stream"] is True and isinstance(body["seed"], float)  # as read: close, not exact
    progress = Progress(body, raw)
    assert progress.feed(b': gw 0 0 5 6\ndata: {"a": 1}\n\n') == b'data: {"a": 1}\n\n'
    resumed = json.loads(progress.resume_body())
    assert resumed["seed"] == big and resumed[RESUME_FIELD] == {"0": [5, 6]}


def test_a_stream_without_annotations_is_relayed_whole_events_at_a_time_as_it_is():
    """Another server's stream (no annotations: the relay's fast path) gives the same whole events however
    it is cut, and its [DONE] ends it."""
    stream = b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    for size in (1, 3, 7, len(stream)):
        progress = progress_of({"stream": True})
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
        relayed = [progress.feed(chunk) for chunk in chunks]
        assert b"".join(relayed) == stream and progress.done and not progress.continuable
        assert all(r.endswith(b"\n\n") for r in relayed if r)  # never a part of an event


async def _events(url: str, path: str, body: dict, cut_after: int | None = None) -> list[dict]:
    """The events a client gets through the gateway's relay (gateway/failover.py), from one engine: the
    whole stream, or `cut_after` events of it and then the rest continued by a second request."""
    progress, delivered = progress_of(body), b""
    headers = {RESUMABLE_HEADER: "1", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=json.dumps(body), headers=headers) as resp:
            async for chunk in resp.content.iter_any():
                delivered += progress.feed(chunk)
                if cut_after is not None and delivered.count(b"data: ") >= cut_after:
                    break  # the engine is gone, as far as this client knows
        if cut_after is not None and not progress.done:
            async with session.post(url + path, data=progress.resume_body(), headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                async for chunk in resp.content.iter_any():
                    delivered += progress.feed(chunk)
    delivered += progress.flush()
    assert b": gw" not in delivered
    events = [sse_event(line) for line in delivered.split(b"\n\n") if line]
    assert events[-1] == DONE and DONE not in events[:-1]
    return events[:-1]


def _chat_choices(events: list[dict]) -> dict:
    """Per choice: its role deltas, text, finish reasons; and the ids and usage the client saw."""
    out: dict = {"ids": {(e["id"], e["created"]) for e in events},  # the cache's share is the engine's own
                 "usage": [dict(e["usage"], prompt_tokens_details=None) for e in events if e["usage"]]}
    for e in events:
        for c in e["choices"]:
            got = out.setdefault(c["index"], {"roles": 0, "text": "", "finish": []})
            got["roles"] += "role" in c["delta"]
            got["text"] += c["delta"].get("content") or ""
            got["finish"] += [c["finish_reason"]] if c["finish_reason"] else []
    return out


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}], ids=["greedy", "seeded"])
def test_engine_continues_a_chat_stream_cut_anywhere(engines, sampling):
    """An engine continues another's stream from the ids the client has: per choice, the client's text is
    the uninterrupted run's, with one role delta, one finish, one id and one usage chunk. Seeded sampling
    continues the same draws (they depend on the seed and the position only)."""
    url = engines[1].url
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count with me"}], "max_tokens": 24, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **sampling}
    whole = asyncio.run(_events(url, "/v1/chat/completions", body))
    want = _chat_choices(whole)
    for cut in (1, len(whole) // 2, len(whole) - 2, len(whole) - 1):
        got = _chat_choices(asyncio.run(_events(url, "/v1/chat/completions", body, cut)))
        assert len(got["ids"]) == 1 and got["usage"] == want["usage"], cut
        for index in (0, 1):
            assert got[index] == want[index] == dict(want[index], roles=1, finish=["length"]), (cut, index)


def test_engine_continues_a_generate_batch_stream(engines):
    """/generate's cumulative events continue where the client's were, with each item's id."""
    url = engines[1].url
    body = {"text": ["one two", "three four five"], "stream": True,
            "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}}
    whole = asyncio.run(_events(url, "/generate", body))
    final = {e["index"]: e for e in whole if e["meta_info"]["finish_reason"]}
    for cut in (2, len(whole) // 2, len(whole) - 1):
        events = asyncio.run(_events(url, "/generate", body, cut))
        for index in (0, 1):
            mine = [e for e in events if e["index"] == index]
            assert len({e["meta_info"]["id"] for e in mine}) == 1, cut
            texts = [e["text"] for e in mine]
            assert texts == sorted(texts, key=len) and mine[-1]["text"] == final[index]["text"], (cut, index)
            assert mine[-1]["output_ids"] == final[index]["output_ids"]
            assert sum(e["meta_info"]["finish_reason"] is not None for e in mine) == 1


def test_engine_continues_a_non_streamed_answer_from_its_checkpoint(engines):
    """Asked by the gateway, a non-streamed answer that runs past CHECKPOINT_INTERVAL sends checkpoints of
    its ids first; an engine given the last one finishes it with the same JSON (n = 2, seeded)."""
    url = engines[1].url
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 600, "n": 2, "temperature": 1.0, "seed": 5,
            "ignore_eos": True}
    whole = http_json(url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})[1]

    async def cut_and_continue() -> tuple[dict, dict[int, int]]:
        progress = progress_of(body)
        headers = {RESUMABLE_HEADER: "1", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                async for chunk in resp.content.iter_any():
                    assert not progress.feed(chunk)  # checkpoints only: nothing for the client yet
                    if len(progress.ids) == 2:
                        break
            had = {c: len(ids) for c, ids in progress.ids.items()}
            async with session.post(url + "/v1/completions", data=progress.resume_body(),  # without checkpoints
                                    headers={"Content-Type": "application/json"}) as resp:
                return await resp.json(), had

    continued, had = asyncio.run(cut_and_continue())
    assert all(0 < n < 600 for n in had.values()), had
    assert [c["text"] for c in continued["choices"]] == [c["text"] for c in whole["choices"]]
    assert continued["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == 1200


@pytest.mark.parametrize("path,body,annotated", [
    ("/generate", {"text": "a", "stream": True, "return_logprob": True}, False),  # cumulative logprobs
    ("/v1/completions", {"prompt": "a", "logprobs": 2, "max_tokens": 600, "ignore_eos": True}, False),  # all
    ("/v1/completions", {"prompt": "a", "max_tokens": 1800, "ignore_eos": True}, True),  # checkpoints (past 0.5 s)
    ("/v1/completions", {"prompt": "a", "logprobs": 2, "stream": True}, True),  # a delta's: its new tokens'
    ("/generate", {"text": "a", "stream": True}, True),
], ids=["generate-logprobs", "completions-logprobs", "completions", "completions-stream-logprobs", "generate"])
def test_answers_a_continuation_could_not_complete_are_not_annotated(engines, path, body, annotated):
    request = urllib.request.Request(engines[1].url + path, json.dumps(body).encode(), method="POST",
                                     headers={RESUMABLE_HEADER: "1", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        raw = resp.read()
    assert (b": gw " in raw) == annotated


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


def test_kill_9_mid_generation_loses_no_request(engines, tmp_path):
    victim, survivor = engines
    runs = [Run(i) for i in range(32)]
    # The run without a kill, on the engine that will die (the survivor's cache stays cold).
    expected = asyncio.run(_gather(victim.url, [Run(i) for i in range(32)]))
    assert all(r.status == 200 and not r.errors and r.usage == MAX_TOKENS for r in expected)

    gateway = _start_gateway([victim], tmp_path, admin={"key_hash": hash_key(ADMIN_KEY)},
                             health={"interval": 0.5, "timeout": 1.0})
    url = next(gateway)
    try:
        async def scenario() -> None:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            tasks = [asyncio.create_task(_run(client, url, r)) for r in runs]
            streams = [r for r in runs if r.stream]
            # Every stream has tokens, and the non-streamed answers have passed their first checkpoint.
            while (min(len(r.arrivals) for r in streams) < STREAMED_BEFORE_KILL
                   or time.monotonic() - min(r.arrivals[0] for r in streams) < CHECKPOINTED):
                assert not any(t.done() for t in tasks), "finished before the kill: raise MAX_TOKENS"
                await asyncio.sleep(0.01)
            status, _ = await asyncio.to_thread(
                http_json, url + "/admin/workers", json.dumps({"url": survivor.url, "name": "survivor"}).encode(),
                {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
            assert status == 201
            os.kill(victim.proc.pid, signal.SIGKILL)
            await asyncio.gather(*tasks)
            await client.close()

        asyncio.run(scenario())
        failovers = _metric(url, "sglang_gw_failovers_total")
    finally:
        gateway.close()

    for run, want in zip(runs, expected):
        label = f"{run.api} stream={run.stream} #{run.i}"
        assert run.status == 200 and not run.errors, (label, run.errors)
        assert run.text == want.text, label  # greedy: identical to the run without the kill
        assert run.usage == MAX_TOKENS, (label, run.usage)
        assert len(run.ids) == 1, (label, run.ids)  # one id (and created) throughout
        if run.api != "generate":
            assert run.finish == "length", label
    print(f"\nfailover: {failovers:.0f} requests continued on the other engine")
    # Every request was continued, none restarted: the streams from the tokens they had, the non-streamed
    # answers from their checkpoints.
    assert failovers == 32


async def _gather(url: str, runs: list[Run]) -> list[Run]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        return list(await asyncio.gather(*(_run(client, url, r) for r in runs)))
