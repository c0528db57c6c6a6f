"""Session affinity (gateway/sessions.py) and predicted vs reported cached tokens (gateway/cache_prediction.py):
the pieces alone on simulated workers, then through a gateway process in front of real engines (tiny model)."""

from __future__ import annotations

import contextlib
import json
import random
import urllib.request

import openai
import pytest
from multidict import CIMultiDict

from conftest import EngineProcess, engine_fleet
from sglang_gw.gateway.auth import hash_key
from sglang_gw.gateway.cache_prediction import CacheLedger, Usage, answer_usage, stream_usage
from sglang_gw.gateway.routing_text import is_batch
from sglang_gw.gateway.config import CachePredictionConfig, SessionConfig, parse_config
from sglang_gw.gateway.policies import Decision, RouteRequest, Worker, create_policy
from sglang_gw.gateway.sessions import Sessions
from sglang_gw.testing import http_json
from test_gateway import _start_gateway

MODEL = "tiny"
gateway = contextlib.contextmanager(_start_gateway)  # stopped however the test ends
ADMIN_KEY = "sk-gw-admin-for-session-tests"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _workers(n: int) -> list[Worker]:
    return [Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}") for i in range(n)]


def _key(sessions: Sessions, **headers) -> bytes | None:
    return sessions.key(CIMultiDict(headers), {}, "m")


# ---- the session table and its key ---------------------------------------------------------------------


def test_session_key_comes_from_the_first_configured_header_then_the_user_field():
    sessions = Sessions(SessionConfig())
    claude = sessions.key(CIMultiDict({"X-Claude-Code-Session-Id": "abc"}), {}, "m")
    assert claude is not None and len(claude) == 16  # a digest: an entry's size does not depend on the client
    assert sessions.key(CIMultiDict({"x-claude-code-session-id": "abc"}), {"user": "bob"}, "m") == claude
    assert sessions.key(CIMultiDict({"session_id": "abc"}), {}, "m") == claude  # the same key in any session header
    assert sessions.key(CIMultiDict({"x-session-id": "abc", "session-id": "zzz"}), {}, "m") == claude  # first wins
    assert sessions.key(CIMultiDict(), {"user": "abc"}, "m") not in (None, claude)  # a user is not a header's value
    assert sessions.key(CIMultiDict(), {"user": "abc"}, "other") != sessions.key(CIMultiDict(), {"user": "abc"}, "m")
    assert sessions.key(CIMultiDict({"x-request-id": "r1"}), {"rid": "r1", "user": ""}, "m") is None
    assert Sessions(SessionConfig(use_user_field=False)).key(CIMultiDict(), {"user": "abc"}, "m") is None
    assert Sessions(SessionConfig(enabled=False)).key(CIMultiDict({"x-session-id": "abc"}), {}, "m") is None
    assert _key(Sessions(SessionConfig(headers=("X-Tenant",))), **{"x-tenant": "t"}) is not None


def test_session_table_is_bounded_and_forgets_idle_sessions():
    clock = Clock()
    sessions = Sessions(SessionConfig(max_sessions=3, idle_timeout=60), clock=clock)
    workers = _workers(4)
    rr = create_policy("round_robin")
    homes = {}
    for s in range(3):
        homes[s] = sessions.choose(rr, workers, RouteRequest("x", _key(sessions, **{"x-session-id": str(s)}))).worker
        clock.now += 10
    assert len(sessions) == 3
    # Session 0 is used again: it is the most recent now, and session 1 the least recent.
    assert sessions.choose(rr, workers, RouteRequest("x", _key(sessions, **{"x-session-id": "0"}))).worker is homes[0]
    sessions.choose(rr, workers, RouteRequest("x", _key(sessions, **{"x-session-id": "3"})))
    assert len(sessions) == 3  # session 1 made room
    assert sessions._lookup(_key(sessions, **{"x-session-id": "1"})) is None
    assert sessions._lookup(_key(sessions, **{"x-session-id": "2"})) == homes[2].name
    clock.now += 50  # session 2 was last used 60 s ago, sessions 0 and 3 50 s ago
    assert sessions._lookup(_key(sessions, **{"x-session-id": "2"})) is None
    assert len(sessions) == 2
    clock.now += 10  # now those two as well
    assert sessions._lookup(_key(sessions, **{"x-session-id": "0"})) is None and len(sessions) == 0


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "power_of_two", "prefix_affinity"])
def test_a_session_stays_until_its_worker_is_overloaded_or_gone_and_then_stays_on_the_new_one(policy):
    moves = []
    sessions = Sessions(SessionConfig(load_margin=2), on_moved=moves.append)
    workers = _workers(3)
    chooser = create_policy(policy, seed=1)
    rng = random.Random(0)

    def turn(candidates=workers) -> Decision:  # every turn's text is new: only the session holds it
        key = _key(sessions, **{"x-session-id": "s"})
        return sessions.choose(chooser, candidates, RouteRequest("".join(rng.choice("abc") for _ in range(200)), key))

    home = turn().worker
    for _ in range(5):
        decision = turn()
        assert (decision.worker, decision.reason) == (home, "session")
    home.inflight = 2  # within the margin of the idlest (0)
    assert turn().worker is home
    home.inflight = 3  # beyond it: the session moves, and stays on its new worker
    new = turn()
    assert new.worker is not home and new.reason != "session" and moves == ["overloaded"]
    home.inflight = 0
    assert all(turn().worker is new.worker for _ in range(3))
    others = [w for w in workers if w is not new.worker]  # its worker drained or dead: not a candidate
    moved = turn(others).worker
    assert moved in others and moves == ["overloaded", "unavailable"]
    assert turn().worker is moved


def test_the_policy_records_a_sessions_request_as_its_own():
    sessions = Sessions(SessionConfig())
    workers = _workers(2)
    policy = create_policy("prefix_affinity", seed=2, block_size=16)
    key = _key(sessions, **{"x-session-id": "s"})
    system = "a long system prompt " * 10
    first = sessions.choose(policy, workers, RouteRequest(system, key))
    other = next(w for w in workers if w is not first.worker)
    # Another client's request with the same prefix: a hit on the session's worker.
    assert policy.choose(workers, RouteRequest(system + "more")).worker is first.worker
    other_session = _key(sessions, **{"x-session-id": "t"})
    first.worker.inflight = 10  # the first request of a session: the policy's choice
    decision = sessions.choose(policy, workers, RouteRequest(system + " and more", other_session))
    assert decision.worker is other and decision.reason == "load_guard"
    first.worker.inflight = 0
    again = sessions.choose(policy, workers, RouteRequest(system + " and more, turn 2", other_session))
    assert (again.worker, again.reason) == (other, "session")
    assert again.matched_bytes >= len(system + " and more") - 16  # recorded for the session's worker
    assert again.prompt_bytes == len(system + " and more, turn 2")


def test_session_config_names_bad_fields():
    from sglang_gw.validation import ConfigError

    with pytest.raises(ConfigError, match=r"session\.headers"):
        parse_config({"workers": [{"url": "http://127.0.0.1:9"}], "session": {"headers": ["bad header"]}})
    with pytest.raises(ConfigError, match=r"session\.max_sessions"):
        parse_config({"workers": [{"url": "http://127.0.0.1:9"}], "session": {"max_sessions": 0}})
    config = parse_config({"workers": [{"url": "http://127.0.0.1:9"}], "session": {"headers": ["X-Conv"]},
                           "cache_prediction": {"window": 0}})
    assert config.session.headers == ("x-conv",) and config.cache_prediction.window == 0
    assert parse_config(config.model_dump(mode="json")) == config  # the effective config loads again


# ---- predicted vs reported cached tokens ------------------------------------------------------------------


def test_usage_is_read_from_json_answers_and_a_streams_last_data_event():
    openai_answer = {"choices": [], "usage": {"prompt_tokens": 50, "prompt_tokens_details": {"cached_tokens": 30}}}
    assert answer_usage(json.dumps(openai_answer).encode()) == Usage(50, 30)
    native = {"text": "x", "meta_info": {"prompt_tokens": 9, "cached_tokens": 4}}
    assert answer_usage(json.dumps(native).encode()) == Usage(9, 4)
    assert answer_usage(json.dumps([native, native]).encode()) is None  # a batch
    assert answer_usage(b'{"usage": {"prompt_tokens": 5, "prompt_tokens_details": null}}') is None
    assert answer_usage(b"not json") is None
    chunk = b'data: {"choices": [{"index": 0, "text": "t"}]}\n\n'
    assert stream_usage(chunk) is None  # no include_usage
    usage = b"data: " + json.dumps(openai_answer).encode() + b"\n\n"
    assert stream_usage(chunk + usage + b"data: [DONE]\n\n") == Usage(50, 30)
    assert stream_usage(b"data: " + json.dumps(native).encode()) == Usage(9, 4)  # no final blank line
    assert is_batch("/generate", {"text": ["a", "b"]}) and is_batch("/v1/completions", {"prompt": [[1], [2]]})
    assert not is_batch("/generate", {"input_ids": [1, 2]}) and not is_batch("/v1/chat/completions", {"messages": []})


def test_ledger_converts_predicted_bytes_with_the_learned_ratio_and_distrusts_unpaid_hits():
    clock = Clock()
    ledger = CacheLedger(CachePredictionConfig(window=4, min_ratio=0.5, cooldown=30), clock=clock)
    w = Worker("w0", "http://127.0.0.1:9000")
    assert ledger.record(Decision(w, "miss", 0, 400), Usage(100, 0)) is None  # the first answer teaches the ratio
    assert ledger.bytes_per_token("w0") == 4.0
    assert ledger.record(Decision(w, "cache_hit", 200, 400), Usage(100, 52)) == 50
    assert ledger.record(Decision(w, "cache_hit", 0, 0), Usage(100, 90)) is None  # a batch: nothing to check
    for _ in range(2):
        ledger.record(Decision(w, "cache_hit", 200, 400), Usage(100, 50))
    assert ledger.payoff("w0") == pytest.approx(152 / 150) and ledger.distrusted() == frozenset()
    for _ in range(3):  # the engine has evicted what the index still claims
        ledger.record(Decision(w, "cache_hit", 200, 400), Usage(100, 5))
    assert ledger.distrusted() == {"w0"} and ledger.payoff("w0") is None  # its window starts afresh
    clock.now += 30
    assert ledger.distrusted() == frozenset()
    off = CacheLedger(CachePredictionConfig(window=0))
    for _ in range(10):
        off.record(Decision(w, "cache_hit", 400, 400), Usage(100, 0))
    assert off.distrusted() == frozenset()


def test_a_distrusted_workers_prefixes_go_by_load():
    workers = _workers(3)
    policy = create_policy("prefix_affinity", seed=3, block_size=16)
    text = "shared tenant prompt " * 20
    home = policy.choose(workers, RouteRequest(text)).worker
    assert policy.choose(workers, RouteRequest(text + "a")).reason == "cache_hit"
    home.inflight = 1  # a least-loaded worker elsewhere
    decision = policy.choose(workers, RouteRequest(text + "b", distrusted=frozenset({home.name})))
    assert decision.worker is not home and decision.reason == "distrusted"
    assert policy.choose(workers, RouteRequest(text + "c")).worker in (home, decision.worker)  # both hold it now


# ---- through a gateway, in front of real engines ------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tiny_models):
    with engine_fleet(3, str(tiny_models["llama"]), "--served-model-name", MODEL,
                      "--max-total-tokens", "20000") as engines:
        yield engines


def _chat(url: str, messages: list[dict], headers: dict | None = None, **extra) -> tuple[dict, object]:
    """(response headers, parsed answer) of a chat completion through the gateway."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, default_headers=headers or {})
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=4,
                                                          temperature=0, extra_body={"ignore_eos": True}, **extra)
    return raw.headers, raw.parse()


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
def test_sessions_stick_to_their_engine_across_turns_and_other_traffic_still_balances(engines, tmp_path, policy):
    with gateway(engines, tmp_path, policy={"name": policy}) as url:
        clients = {"claude": {"x-claude-code-session-id": "cc-1"}, "codex": {"session_id": "cx-1"},
                   "generic": {"x-session-id": "g-1"}}
        homes: dict[str, set[str]] = {name: set() for name in clients}
        others: list[str] = []
        for turn in range(4):
            for name, headers in clients.items():  # each turn's prompt differs: only the key ties them
                got, _ = _chat(url, [{"role": "user", "content": f"{name} asks question {turn}"}], headers)
                homes[name].add(got["x-sglang-gw-worker"])
                assert turn == 0 or got["x-sglang-gw-route"] == "session"
            got, _ = _chat(url, [{"role": "user", "content": f"unrelated {turn}"}], user=f"user-{policy}")
            assert turn == 0 or got["x-sglang-gw-route"] == "session"  # the OpenAI `user` field is a key too
            for i in range(3):
                got, _ = _chat(url, [{"role": "user", "content": f"anonymous {turn}.{i}"}])
                others.append(got["x-sglang-gw-worker"])
                assert got["x-sglang-gw-route"] == policy
        assert all(len(h) == 1 for h in homes.values()), homes
        assert len(set(others)) == 3 if policy == "round_robin" else len(set(others)) >= 2, others
        assert _metrics(url)[("sglang_gw_sessions", ())] == 4


def test_a_session_moves_off_a_drained_or_dead_engine_and_stays_on_the_new_one(engines, tiny_models, tmp_path):
    extra = EngineProcess(str(tiny_models["llama"]), "--served-model-name", MODEL, "--max-total-tokens", "20000")
    try:
        extra.wait_ready()
        two = [extra, engines[0]]  # named e0 (the extra engine) and e1

        def admin(path: str) -> None:
            assert http_json(url + path, b"", headers={"Authorization": f"Bearer {ADMIN_KEY}"})[0] == 200

        with gateway(two, tmp_path, policy={"name": "least_conn"}, admin={"key_hash": hash_key(ADMIN_KEY)}) as url:
            session = {"x-session-id": "moving"}

            def worker_of(turn: str) -> tuple[str, str]:
                got, _ = _chat(url, [{"role": "user", "content": turn}], session)
                return got["x-sglang-gw-worker"], got["x-sglang-gw-route"]

            admin("/admin/workers/e1/drain")  # the session starts on e0
            assert worker_of("first") == ("e0", "least_conn")
            admin("/admin/workers/e1/undrain")
            assert worker_of("second") == ("e0", "session")
            admin("/admin/workers/e0/drain")
            assert worker_of("third") == ("e1", "least_conn")  # moved ...
            admin("/admin/workers/e0/undrain")
            assert worker_of("fourth") == ("e1", "session")  # ... and stays, its old engine back or not
            admin("/admin/workers/e1/drain")
            assert worker_of("fifth")[0] == "e0"
            admin("/admin/workers/e1/undrain")
            extra.stop()  # e0 dies: the next request fails there and is retried on e1, which keeps the session
            assert worker_of("sixth") in (("e1", "retry"), ("e1", "least_conn"))
            assert worker_of("seventh") == ("e1", "session")
            moves = _metrics(url)
            assert moves[("sglang_gw_session_moves_total", (("why", "unavailable"),))] >= 3
    finally:
        extra.stop()


def test_predicted_cached_tokens_agree_with_what_the_engine_reports(engines, tmp_path):
    """A conversation on prefix_affinity: from the second turn on, each answer's predicted cached tokens
    (index bytes over the learned bytes-per-token ratio) are within 5% of its prompt of what the
    engine reports (measured: 1-2%). The engine caches a bit more (the earlier answers' tokens, the part of the last
    routing block the index does not count), never much less."""
    with gateway(engines, tmp_path, policy={"name": "prefix_affinity", "block_size": 32}) as url:
        rng = random.Random(7)
        messages = [{"role": "system", "content": " ".join(rng.choice(["routing", "cache", "prefix", "engine"])
                                                           for _ in range(120))}]
        worker = None
        for turn in range(5):
            messages.append({"role": "user", "content": f"turn {turn}: " + " ".join(
                rng.choice(["why", "how", "when"]) for _ in range(8))})
            before = _metrics(url)
            stream = turn == 3  # a streamed turn reports its usage in its last chunk
            if stream:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
                usage = chunks[-1].usage
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                headers, answer = _chat(url, messages)
                assert worker in (None, headers["x-sglang-gw-worker"])
                worker, usage, text = headers["x-sglang-gw-worker"], answer.usage, answer.choices[0].message.content
            after = _metrics(url)
            reported, predicted = (after.get(key, 0) - before.get(key, 0) for key in (
                ("sglang_gw_reported_cached_tokens_total", (("worker", worker),)),
                ("sglang_gw_predicted_cached_tokens_total", (("worker", worker),))))
            assert reported == usage.prompt_tokens_details.cached_tokens
            if turn > 0:
                assert abs(predicted - reported) <= 0.05 * usage.prompt_tokens, (turn, predicted, reported, usage)
                assert predicted > 0.8 * usage.prompt_tokens
            messages.append({"role": "assistant", "content": text})
        assert 0.95 <= after[("sglang_gw_cache_prediction_payoff", (("worker", worker),))] <= 1.2
        assert after[("sglang_gw_cache_prediction_distrusted", (("worker", worker),))] == 0
