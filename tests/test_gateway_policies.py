"""Routing policies and the prefix index, on simulated workers (no HTTP: the policies alone)."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from sglang_gw.gateway.policies import Blocks, RouteRequest, Worker, create_policy
from sglang_gw.gateway.prefix_index import PrefixIndex, block_chain


def _workers(n: int) -> list[Worker]:
    return [Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}") for i in range(n)]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))


def test_prefix_index_matches_whole_blocks_and_forgets():
    index = PrefixIndex(block_size=8, max_bytes_per_worker=1024)
    base = "0123456789abcdefghij"  # two whole blocks and 4 bytes
    index.insert(index.chain(base), "a")
    assert index.match(index.chain(base + "more text"), "a") == 16
    assert index.match(index.chain("0123456X" + base[8:]), "a") == 0  # the chain breaks at the first block
    assert index.match(index.chain(base), "b") == 0
    index.forget("a")
    assert index.match(index.chain(base), "a") == 0


def test_prefix_index_is_bounded_and_evicts_deepest_blocks_first():
    rng = random.Random(0)
    index = PrefixIndex(block_size=16, max_bytes_per_worker=16 * 20)
    kept = _text(rng, 16 * 5)
    for i in range(50):
        index.insert(index.chain(_text(rng, rng.randint(0, 16 * 8))), "w")
        index.insert(index.chain(kept), "w")  # the hot prompt is refreshed every round
        index.check()
        assert index.bytes_of("w") <= 16 * 20
    assert index.match(index.chain(kept), "w") == 16 * 5
    # Whatever survives of any prompt is a prefix of it: matches are whole leading runs of blocks.
    probe = _text(rng, 16 * 8)
    index.insert(index.chain(probe), "w")
    for _ in range(3):
        index.insert(index.chain(_text(rng, 16 * 6)), "w")
    chain = index.chain(probe)
    matched_blocks = index.match(chain, "w") // 16
    assert all(h in index._blocks["w"] for h in chain[:matched_blocks])


def test_prefix_index_match_is_the_leading_run_of_held_blocks_under_eviction():
    """match's binary search relies on a worker's held blocks of any chain being a leading run: checked
    against a walk of the chain, over prompts that share prefixes and an index that keeps evicting."""
    rng = random.Random(7)
    index = PrefixIndex(block_size=8, max_bytes_per_worker=8 * 40)
    trunks = [_text(rng, 8 * rng.randint(1, 6)) for _ in range(6)]
    prompts = []
    for _ in range(400):
        prompt = rng.choice(trunks) + _text(rng, rng.randint(0, 8 * 8))
        prompts.append(prompt)
        index.insert(index.chain(prompt), "w")
        index.check()
        for probe in rng.sample(prompts, min(5, len(prompts))) + [prompt + _text(rng, 20)]:
            chain = index.chain(probe)
            walked = next((i for i, h in enumerate(chain) if h not in index._blocks["w"]), len(chain))
            assert index.match(chain, "w") == walked * 8


def test_prefix_index_insert_keeps_the_lru_order_of_moving_each_block_from_last_to_first():
    """insert's two C-level passes leave the blocks in the order (and evict the ones) that moving each block
    of the chain to the end, from its last to its first, would: checked against that loop, block by block."""
    rng = random.Random(11)
    index = PrefixIndex(block_size=8, max_bytes_per_worker=8 * 30)
    reference: OrderedDict[int, None] = OrderedDict()
    trunks = [_text(rng, 8 * rng.randint(1, 5)) for _ in range(5)]
    for _ in range(300):
        chain = index.chain(rng.choice(trunks) + _text(rng, rng.randint(0, 8 * 6)))
        index.insert(chain, "w")
        for h in reversed(chain):
            reference[h] = None
            reference.move_to_end(h)
        while len(reference) > 30:
            reference.popitem(last=False)
        assert list(index._blocks["w"]) == list(reference)


def test_round_robin_least_conn_power_of_two():
    workers = _workers(3)
    rr = create_policy("round_robin")
    assert [rr.choose(workers, RouteRequest("x")).worker.name for _ in range(6)] == ["w0", "w1", "w2"] * 2
    workers[0].inflight, workers[1].inflight, workers[2].inflight = 5, 1, 3
    assert create_policy("least_conn", seed=1).choose(workers, RouteRequest("x")).worker.name == "w1"
    p2 = create_policy("power_of_two", seed=2)
    for _ in range(50):
        assert p2.choose(workers, RouteRequest("x")).worker.name != "w0"  # w0 loses every pair it is in
    with pytest.raises(ValueError, match="policy"):
        create_policy("fastest")


def test_prefix_affinity_keeps_conversations_on_their_worker_and_spreads_tenants():
    rng = random.Random(1)
    workers = _workers(4)
    policy = create_policy("prefix_affinity", seed=3, block_size=32)
    conversations = {c: _text(rng, 600) for c in range(12)}  # a long system prompt per tenant
    home: dict[int, str] = {}
    for turn in range(5):
        for c, history in conversations.items():
            history += f" user turn {turn}: " + _text(rng, 80)
            decision = policy.choose(workers, RouteRequest(history))
            if turn == 0:
                assert decision.reason == "miss"
                home[c] = decision.worker.name
            else:
                assert (decision.worker.name, decision.reason) == (home[c], "cache_hit")
                assert decision.matched_bytes >= 600
            conversations[c] = history + " assistant: " + _text(rng, 80)
    # Misses go to the least-loaded worker holding the fewest prefix bytes: 3 tenants each.
    assert sorted(list(home.values()).count(w.name) for w in workers) == [3, 3, 3, 3]


def test_prefix_affinity_burst_on_one_prefix_spreads_past_the_load_margin():
    rng = random.Random(2)
    workers = _workers(4)
    policy = create_policy("prefix_affinity", seed=4, block_size=32, load_margin=2)
    hot = _text(rng, 1000)
    reasons = []
    for i in range(24):  # concurrent: none of them finishes during the burst
        decision = policy.choose(workers, RouteRequest(hot + _text(rng, 20)))
        decision.worker.inflight += 1
        reasons.append(decision.reason)
        loads = [w.inflight for w in workers]
        assert max(loads) - min(loads) <= 2 + 1, loads
    # Each other worker received the hot prefix once through the load guard, then shared it as a holder.
    assert reasons[0] == "miss" and reasons.count("load_guard") == 3
    assert all(w.inflight >= 4 for w in workers), [w.inflight for w in workers]


def test_prefix_affinity_places_a_new_prefix_where_it_fits_within_the_load_margin():
    rng = random.Random(3)
    workers = _workers(3)
    policy = create_policy("prefix_affinity", seed=6, block_size=16, load_margin=2)
    for w, tenants in zip(workers, (3, 1, 0), strict=True):  # w2 holds nothing yet
        for _ in range(tenants):
            policy.place(w, RouteRequest(_text(rng, 400)), "miss")
    workers[0].inflight, workers[1].inflight, workers[2].inflight = 0, 1, 2
    decision = policy.choose(workers, RouteRequest(_text(rng, 400)))
    assert (decision.worker.name, decision.reason) == ("w2", "miss")  # busier, but within the margin
    workers[2].inflight = 3  # past it: the next-emptiest within the margin
    assert policy.choose(workers, RouteRequest(_text(rng, 400))).worker.name == "w1"


def test_prefix_affinity_forgets_a_restarted_worker():
    workers = _workers(2)
    policy = create_policy("prefix_affinity", seed=5, block_size=16)
    text = "x" * 200
    first = policy.choose(workers, RouteRequest(text)).worker
    assert policy.choose(workers, RouteRequest(text + "y")).reason == "cache_hit"
    policy.forget(first)
    assert policy.choose(workers, RouteRequest(text + "z")).reason == "miss"


def test_a_block_chain_names_each_prefix_of_whole_blocks():
    """One hash per whole block; a text's chain begins with the chain of any prefix of it, and a changed byte
    in block i changes hash i and every one after it."""
    text = bytes(range(256)) * 3 + b"tail"
    for size in (1, 7, 64):
        chain = block_chain(text, size)
        assert len(chain) == len(text) // size
        for cut in (0, size - 1, size, 5 * size + 3, len(text)):
            assert block_chain(text[:cut], size) == chain[:cut // size]
        changed = block_chain(text[:2 * size] + b"\xff" + text[2 * size + 1:], size)
        assert changed[:2] == chain[:2] and all(a != b for a, b in zip(changed[2:], chain[2:]))


def test_prefix_affinity_routes_a_relays_block_chain_as_the_text_it_stands_for():
    """A relay sends the text's chain (RouteRequest.blocks), not the text: the same routing, and no match for a
    chain cut at another block size (a reload changed it while the request was on its way)."""
    workers = _workers(3)
    policy = create_policy("prefix_affinity", seed=5, block_size=16)
    text = "x" * 200

    def sent(text: str, block_size: int = 16) -> RouteRequest:
        return RouteRequest("", blocks=Blocks(block_size, block_chain(text.encode(), block_size), len(text.encode())))

    home = policy.choose(workers, sent(text))
    assert (home.matched_bytes, home.prompt_bytes) == (0, 200)
    again = policy.choose(workers, RouteRequest(text + "y"))  # the same chain as a text in this process
    assert (again.worker, again.reason, again.matched_bytes) == (home.worker, "cache_hit", 192)
    assert policy.choose(workers, sent(text + "z")).worker is home.worker
    assert policy.choose(workers, sent(text, block_size=8)).reason == "miss"


def test_chat_routing_text_is_the_rendered_template_when_the_tokenizer_is_local(tiny_models):
    from transformers import AutoTokenizer

    from sglang_gw.gateway.routing_text import RoutingText

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    text = RoutingText()
    fallback = text("/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert fallback == "<system>be brief\n<user>hi\n"
    text.add_template("tiny", str(tiny_models["llama"]))
    rendered = text("/v1/chat/completions", {"model": "tiny", "messages": messages})
    expected = AutoTokenizer.from_pretrained(tiny_models["llama"]).apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], tokenize=False,
        add_generation_prompt=True)
    assert rendered == expected != fallback
    text.add_template("remote", "/not/on/this/host")
    assert text("/v1/chat/completions", {"model": "remote", "messages": messages}) == fallback
    assert text("/v1/completions", {"prompt": "abc"}) == "abc"
    assert text("/generate", {"input_ids": [1, 2]}) == "1,2,"


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "power_of_two"])
@pytest.mark.parametrize("option, value", [("block_size", 32), ("max_bytes_per_worker", 1 << 20),
                                           ("min_match_ratio", 0.5), ("load_margin", 2)])
def test_an_option_the_policy_does_not_take_is_refused_naming_the_field(policy, option, value):
    from sglang_gw.gateway.config import parse_config
    from sglang_gw.validation import ConfigError

    with pytest.raises(ConfigError, match=rf"^config: policy\.{option}: only used by prefix_affinity$"):
        parse_config({"workers": [{"url": "http://127.0.0.1:9"}], "policy": {"name": policy, option: value}})


def test_policy_options_are_the_policys_own_and_the_effective_config_loads_again():
    from sglang_gw.gateway.config import PolicyConfig, parse_config
    from sglang_gw.gateway.policies import POLICIES

    # Every config option is some policy's keyword argument, and the other way round.
    assert set(PolicyConfig.model_fields) - {"name"} == set().union(*(p.option_names() for p in POLICIES.values()))
    tuned = PolicyConfig(name="prefix_affinity", load_margin=9)
    assert tuned.options() == {"block_size": 64, "max_bytes_per_worker": 64 << 20, "min_match_ratio": 0.3,
                               "load_margin": 9}
    assert create_policy(tuned.name, **tuned.options()).load_margin == 9
    for name in POLICIES:
        dumped = PolicyConfig(name=name).model_dump()
        reloaded = parse_config({"workers": [{"url": "http://127.0.0.1:9"}], "policy": dumped}).policy
        assert reloaded == PolicyConfig(name=name) and set(reloaded.options()) == POLICIES[name].option_names()
