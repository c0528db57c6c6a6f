"""Routing quality at tight caches, simulated: the gateway's policies (their real code) in front of
simulated engines, next to an oracle that knows every engine's cache and SGLang's router's
cache-aware policy. Seconds per run, no processes: benchmarks/bench_routing.py measures real engines.

    python benchmarks/sim_routing.py [--engines 4] [--cache-tokens 10000] [--tenants 16] [--conversations 4]
                                     [--turns 6] [--concurrency 16]

A simulated engine's prefix cache is an LRU of 16-token blocks chained by hash, evicted deepest block
first (gateway/prefix_index.py's structure, bounded by the engine's KV tokens): a prompt's cached part
is its leading run of blocks the engine holds; the prompt enters at once (concurrent requests share it),
prompt plus answer when the answer is done. A token is a 4-byte word, so routing text bytes are 4x
tokens. A request lasts 20 ms + 0.05 ms per uncached prompt token + 10 ms per answer token, times
(1 + load_cost x the other requests on its engine when it starts) — `--load-cost 0`: load costs
nothing, and locality always pays (routing sees load only as in-flight counts, as the gateway does).
Mean request latency is reported next to the hit rate (not for `pooled`: its one engine does the work of
all, so with --load-cost its latency says nothing about routing).

The trace: every tenant has a long system prompt and several conversations; each conversation's turns
run in order (the next once the last is answered), `--concurrency` requests in flight at a time. Then
a burst: 64 requests on one new prefix at once.

Two upper bounds: `pooled`, one engine with all the engines' cache (the issue's oracle: no routing
can keep more, since every prefix is cached once), and `oracle`, prefix_affinity knowing the engines'
true caches instead of predicting them. Reported per policy: the prefix-cache hit rate (cached / prompt
tokens) and its share of each bound's, the lowest and highest share of requests a worker got, and the
burst's highest share on one worker and its median latency (each burst request's, as it starts).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import deque

from sglang_gw.gateway.cache_prediction import CacheLedger, Usage
from sglang_gw.gateway.config import CachePredictionConfig
from sglang_gw.gateway.policies import Decision, RouteRequest, RoutingPolicy, Worker, create_policy
from sglang_gw.gateway.prefix_index import PrefixIndex

TOKEN_BYTES = 4
BLOCK_TOKENS = 16
ANSWER_TOKENS = 100
USER_TOKENS = 50


def words(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") + rng.choice("aeiou") + rng.choice("bcdfg") + " "
                   for _ in range(n))


class Engine:
    """A simulated engine's prefix cache, bounded by its KV tokens."""

    def __init__(self, cache_tokens: int):
        self.cache = PrefixIndex(BLOCK_TOKENS * TOKEN_BYTES, cache_tokens * TOKEN_BYTES)

    def cached_tokens(self, text: str) -> int:
        return self.cache.match(self.cache.chain(text), "kv") // TOKEN_BYTES

    def insert(self, text: str) -> None:
        self.cache.insert(self.cache.chain(text), "kv")


class TrueCaches(PrefixIndex):
    """A prefix index whose matches are the engines' true caches: prefix_affinity with it is the oracle,
    the same rule knowing what the engines hold (it still spreads new prefixes by the bytes it sent)."""

    def __init__(self, engines: dict[str, Engine]):
        super().__init__(BLOCK_TOKENS * TOKEN_BYTES, 1 << 40)
        self.engines = engines

    def match(self, chain: list[int], worker: str) -> int:
        return self.engines[worker].cache.match(chain, "kv")


class SGLangCacheAware(RoutingPolicy):
    """SGLang's router's cache_aware policy (docs/routing.md): least-loaded when the fleet is imbalanced
    (gap > balance_abs and max > balance_rel x min), else the longest match if it covers more than
    cache_threshold of the text, else the worker with the smallest tree. Its tree is character-level
    and practically unbounded: here, one-token blocks and no budget to speak of."""

    name = "sglang_cache_aware"

    def __init__(self, seed: int | None = None, cache_threshold: float = 0.3, balance_abs: int = 64,
                 balance_rel: float = 1.5):
        super().__init__(seed)
        self.tree = PrefixIndex(TOKEN_BYTES, 1 << 40)
        self.cache_threshold, self.balance_abs, self.balance_rel = cache_threshold, balance_abs, balance_rel

    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        chain = self.tree.chain(request.text)
        loads = [w.inflight for w in candidates]
        if max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads):
            decision = Decision(self.least_loaded(candidates), "imbalanced")
        else:
            matched = {w.name: self.tree.match(chain, w.name) for w in candidates}
            best = max(matched.values())
            if best > self.cache_threshold * request.text_bytes:
                decision = Decision(self.least_loaded([w for w in candidates if matched[w.name] == best]), "hit")
            else:
                smallest = min(candidates, key=lambda w: (self.tree.bytes_of(w.name), self.rng.random()))
                decision = Decision(smallest, "miss")
        self.tree.insert(chain, decision.worker.name)
        return decision


def run(policy_name: str, args, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pooled = policy_name == "pooled"
    workers = [Worker(f"e{i}", "") for i in range(1 if pooled else args.engines)]
    engines = {w.name: Engine(args.cache_tokens * (args.engines if pooled else 1)) for w in workers}
    if pooled:
        policy: RoutingPolicy = create_policy("least_conn", seed)
    elif policy_name == "sglang_cache_aware":
        policy = SGLangCacheAware(seed)
    else:
        policy = create_policy("prefix_affinity" if policy_name == "oracle" else policy_name, seed, **(
            {"load_margin": args.load_margin} if policy_name in ("oracle", "prefix_affinity") else {}))
    if policy_name == "oracle":
        policy.index = TrueCaches(engines)
    ledger = CacheLedger(CachePredictionConfig())
    systems = [f"tenant {t}: " + words(rng, args.system_tokens) for t in range(args.tenants)]
    conversations = [(t, c) for t in range(args.tenants) for c in range(args.conversations)]
    history = {conv: systems[conv[0]] for conv in conversations}
    ready = deque(rng.sample(conversations, len(conversations)))
    turns = dict.fromkeys(conversations, 0)
    running: list = []  # (finish time, sequence, conversation, worker, prompt + answer)
    now, sequence = 0.0, 0
    cached = prompt = 0
    latency: list[float] = []
    requests = dict.fromkeys(engines, 0)

    def start(text: str, conv) -> str:
        """Route and start one request; the worker's name."""
        nonlocal cached, prompt, sequence
        route = RouteRequest(text, distrusted=ledger.distrusted())
        decision = policy.choose(workers, route)
        worker, engine = decision.worker, engines[decision.worker.name]
        hit = engine.cached_tokens(text)
        tokens = len(text) // TOKEN_BYTES
        ledger.record(decision, Usage(tokens, hit))
        cached, prompt = cached + hit, prompt + tokens
        requests[worker.name] += 1
        worker.inflight += 1
        engine.insert(text)
        answer = words(rng, ANSWER_TOKENS)
        duration = (0.02 + 0.00005 * (tokens - hit) + 0.01 * ANSWER_TOKENS) * (1 + args.load_cost * (worker.inflight - 1))
        latency.append(duration)
        sequence += 1
        heapq.heappush(running, (now + duration, sequence, conv, worker, text + answer))
        return worker.name

    while ready or running:
        while ready and len(running) < args.concurrency:
            conv = ready.popleft()
            history[conv] += f"user {turns[conv]}: " + words(rng, USER_TOKENS)
            start(history[conv], conv)
        now, _, conv, worker, text = heapq.heappop(running)
        worker.inflight -= 1
        engines[worker.name].insert(text)
        history[conv] = text
        turns[conv] += 1
        if turns[conv] < args.turns:
            ready.append(conv)
    shares = [n / sum(requests.values()) for n in requests.values()]
    hit_rate, mean_latency = cached / prompt, sum(latency) / len(latency)

    hot = "burst: " + words(rng, args.system_tokens)
    start(hot, None)  # one request first, so that one worker holds the prefix, then 64 more at once
    burst = [start(hot + words(rng, USER_TOKENS), None) for _ in range(64)]
    return {"hit_rate": hit_rate, "latency": mean_latency, "min_share": min(shares), "max_share": max(shares),
            "burst_max_share": max(map(burst.count, engines)) / len(burst),
            "burst_p50": statistics.median(latency[-len(burst):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--cache-tokens", type=int, default=10_000, help="each engine's KV pool, in tokens")
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--conversations", type=int, default=4, help="per tenant")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-cost", type=float, default=0.0,
                    help="how much each other request on an engine slows a request (0.1: ten make it twice as slow)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per policy, averaged")
    ap.add_argument("--load-margin", type=int, default=RoutingPolicy.load_margin,
                    help="prefix_affinity's (and the oracle's)")
    ap.add_argument("--policies", default="pooled,oracle,prefix_affinity,sglang_cache_aware,least_conn,round_robin")
    args = ap.parse_args()
    print(f"{args.engines} engines x {args.cache_tokens}-token caches; {args.tenants} tenants x "
          f"{args.conversations} conversations x {args.turns} turns; {args.system_tokens}-token system prompts; "
          f"concurrency {args.concurrency}; load margin {args.load_margin}; load cost {args.load_cost}; "
          f"{args.seeds} seeds")
    bounds: dict[str, float] = {}
    for name in args.policies.split(","):
        runs = [run(name, args, seed) for seed in range(args.seeds)]
        result = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
        if name in ("pooled", "oracle"):
            bounds[name] = result["hit_rate"]
        of_bounds = "  ".join(f"{result['hit_rate'] / rate:6.1%} of {bound}" for bound, rate in bounds.items())
        # pooled is a bound on hit rate only: one engine, so no balance, and its latency is one engine's compute.
        figures = "" if name == "pooled" else (f"  mean latency {result['latency']:.2f} s"
                                               f"   request shares {result['min_share']:.3f}-{result['max_share']:.3f}"
                                               f"   burst max share {result['burst_max_share']:.2f}"
                                               f" p50 {result['burst_p50']:.2f} s")
        print(f"{name:20s} hit rate {result['hit_rate']:.3f}  {of_bounds:36s}{figures}", flush=True)


if __name__ == "__main__":
    main()
