"""Constrained vs unconstrained decoding on one engine (issue #11), in one run.

  throughput  the same prompts at batch 1 (one request at a time) and at batch 32 (all at once): a JSON
              schema's constrained output (greedy), with and without jump-forward, against unconstrained
              output of exactly the same lengths (max_new_tokens = each constrained output's length,
              ignore_eos). Output tokens/s; jump-forward's forced tokens count as output (they are).
  first token request → first output token (streamed) for a never-seen schema (each request brings a
              new one), for a schema seen before (compiled-grammar cache hit), and unconstrained.
  cache       grammars compiled and compiled-grammar cache hits over the whole run.
  mask        the cost of one step's masks at batch 32: filling them (llguidance's batch API) and
              applying them to the logits, with 32 matchers walking random allowed tokens.

Rounds interleave the variants (constrained with jump-forward, without, unconstrained) so that drift in
the machine's load hits all of them alike; figures are medians over --rounds.

    python benchmarks/bench_structured.py --threads 2 --json structured.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import torch
from tqdm import tqdm

from sglang_gw.engine import Engine, SamplingParams
from sglang_gw.engine.grammar import apply_bitmask
from sglang_gw.engine.sampling_params import GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"enum": ["shipped", "processing", "cancelled"]},
        "tracking_number": {"type": "string", "pattern": "^[A-Z0-9]{10}$"},
        "estimated_delivery": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "items": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["name", "qty"], "additionalProperties": False}},
        "suggested_reply": {"type": "string", "maxLength": 120},
    },
    "required": ["status", "tracking_number", "estimated_delivery", "items", "suggested_reply"],
    "additionalProperties": False,
}
PRODUCTS = ["blue kettle", "running shoes", "phone case", "desk lamp", "coffee beans", "yoga mat", "backpack",
            "headphones"]


def prompts(engine: Engine, count: int) -> list[str]:
    rng = random.Random(0)
    texts = []
    for i in range(count):
        order = ", ".join(rng.sample(PRODUCTS, 2))
        question = (f"Customer #{1000 + i} writes: I ordered {order} {rng.randint(2, 9)} days ago and it has not "
                    f"arrived. Where is my order? Answer as JSON with the order status, tracking number, "
                    f"estimated delivery date, the items and a short suggested reply.")
        texts.append(engine.apply_chat_template([{"role": "user", "content": question}]))
    return texts


def run_batch(engine: Engine, texts: list[str], params: list[SamplingParams], batch: int) -> tuple[float, list]:
    """Wall seconds and outputs: `batch` 1 runs the requests one after another, otherwise all at once.
    The prefix cache is emptied first: every variant prefills the same prompts."""
    assert engine.flush_cache()
    started = time.perf_counter()
    if batch == 1:
        outs = [engine.generate(text, p)[0] for text, p in zip(texts, params)]
    else:
        outs = engine.generate(texts, params)
    return time.perf_counter() - started, outs


def throughput(engines: dict[str, Engine], texts: list[str], batch: int, rounds: int, max_tokens: int) -> dict:
    """Output tokens/s of each variant (median over rounds) and the constrained outputs' validity."""
    schema = json.dumps(SCHEMA)
    constrained = [SamplingParams(max_new_tokens=max_tokens, temperature=0, json_schema=schema)] * len(texts)
    rates: dict[str, list[float]] = {"jump_forward": [], "no_jump_forward": [], "unconstrained": []}
    completed = tokens = 0
    for _ in tqdm(range(rounds), desc=f"throughput, batch {batch}", leave=False):
        lengths = None
        for variant in ("jump_forward", "no_jump_forward"):
            seconds, outs = run_batch(engines[variant], texts, constrained, batch)
            rates[variant].append(sum(o.completion_tokens for o in outs) / seconds)
            lengths = lengths or [o.completion_tokens for o in outs]
            completed += sum(o.finish_reason.type == "stop" for o in outs)
            tokens += sum(o.completion_tokens for o in outs)
        same_lengths = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        seconds, outs = run_batch(engines["jump_forward"], texts, same_lengths, batch)
        assert [o.completion_tokens for o in outs] == lengths
        rates["unconstrained"].append(sum(lengths) / seconds)
    result = {name: statistics.median(values) for name, values in rates.items()}
    result.update(outputs=2 * rounds * len(texts), completed=completed, mean_tokens=tokens / (2 * rounds * len(texts)))
    return result


async def first_token_seconds(engine: Engine, text: str, params: SamplingParams) -> float:
    """Seconds to the first output token; the stream is read to its end, so the next request runs alone."""
    started = time.perf_counter()
    first = None
    async for out in engine.generate_stream(text, params):
        if out.completion_tokens and first is None:
            first = time.perf_counter() - started
    return first


def first_token(engine: Engine, texts: list[str], count: int) -> dict:
    """Median request → first token, for new schemas, a cached schema, and no schema."""
    def fresh_schema(i: int) -> str:  # same shape, new property names: nothing to reuse
        props = {f"{name}_{i}": spec for name, spec in SCHEMA["properties"].items()}
        return json.dumps(dict(SCHEMA, properties=props, required=list(props)))

    variants = {
        "new_schema": lambda i: SamplingParams(max_new_tokens=16, temperature=0, json_schema=fresh_schema(i)),
        "cached_schema": lambda i: SamplingParams(max_new_tokens=16, temperature=0, json_schema=json.dumps(SCHEMA)),
        "unconstrained": lambda i: SamplingParams(max_new_tokens=16, temperature=0),
    }
    engine.generate(texts[0], variants["cached_schema"](0))  # compiled once before timing the hits
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in tqdm(range(count), desc="first token", leave=False):
        for name, make in variants.items():
            engine.flush_cache()  # every request prefills its whole prompt
            times[name].append(asyncio.run(first_token_seconds(engine, texts[i % len(texts)], make(i))))
    return {name: statistics.median(values) for name, values in times.items()}


def mask_cost(engine: Engine, batch: int = 32, steps: int = 60) -> dict:
    """Median and p90 milliseconds to fill and to apply one step's masks for `batch` constrained rows."""
    grammar = engine.grammar
    compiled = grammar.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    matchers = [grammar.matcher(compiled) for _ in range(batch)]
    bitmask = torch.empty(batch, grammar.words_per_mask, dtype=torch.int32)
    logits = torch.randn(batch, grammar.vocab_size)
    rng = random.Random(0)
    fill, apply = [], []
    for _ in range(steps):
        started = time.perf_counter()
        grammar.fill_bitmask(matchers, bitmask)
        filled = time.perf_counter()
        apply_bitmask(logits.clone(), bitmask)
        apply.append(time.perf_counter() - filled)
        fill.append(filled - started)
        allowed_rows = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)
        for matcher, allowed in zip(matchers, allowed_rows):
            if not matcher.is_stopped():
                matcher.accept(rng.choice(allowed.nonzero().flatten().tolist()))

    def ms(values):
        values = sorted(values)
        return {"p50_ms": 1e3 * values[len(values) // 2], "p90_ms": 1e3 * values[int(len(values) * 0.9)]}

    return {"batch": batch, "fill": ms(fill), "apply": ms(apply)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--first-token-requests", type=int, default=10)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    common = dict(model=args.model, num_threads=args.threads, max_running_requests=64, batch_log_interval=60)
    engines = {"jump_forward": Engine(**common), "no_jump_forward": Engine(**common, disable_jump_forward=True)}
    texts = prompts(engines["jump_forward"], max(int(b) for b in args.batches.split(",")))
    results = {"throughput": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        count = 4 if batch == 1 else batch  # batch 1: four requests, one after another
        results["throughput"][batch] = throughput(engines, texts[:count], batch, args.rounds, args.max_tokens)
    results["first_token_seconds"] = first_token(engines["jump_forward"], texts, args.first_token_requests)
    results["grammar"] = {name: engine.grammar_counts() for name, engine in engines.items()}
    results["mask"] = mask_cost(engines["jump_forward"])
    for engine in engines.values():
        engine.shutdown()

    print(f"\nconstrained (JSON schema, greedy) vs unconstrained output of the same lengths; medians of "
          f"{args.rounds} rounds; {args.threads} threads")
    print(f"{'batch':>5} {'tokens/s: jump-fwd':>19} {'no jump-fwd':>12} {'unconstrained':>14} "
          f"{'ratio jf':>9} {'ratio no-jf':>12} {'completed':>10}")
    for batch, r in results["throughput"].items():
        print(f"{batch:>5} {r['jump_forward']:>19.1f} {r['no_jump_forward']:>12.1f} {r['unconstrained']:>14.1f} "
              f"{r['jump_forward'] / r['unconstrained']:>9.2f} {r['no_jump_forward'] / r['unconstrained']:>12.2f} "
              f"{r['completed']:>5}/{r['outputs']}")
    ft = results["first_token_seconds"]
    print(f"\nrequest → first token (median of {args.first_token_requests}): new schema {ft['new_schema'] * 1e3:.1f} ms, "
          f"cached schema {ft['cached_schema'] * 1e3:.1f} ms, unconstrained {ft['unconstrained'] * 1e3:.1f} ms")
    g = results["grammar"]["jump_forward"]
    lookups = g["grammar_compiled"] + g["grammar_cache_hits"]
    print(f"compiled grammars: {g['grammar_compiled']} compiled, {g['grammar_cache_hits']} cache hits "
          f"({g['grammar_cache_hits'] / lookups:.0%}); {g['grammar_forced_tokens']} tokens jumped forward")
    m = results["mask"]
    print(f"one step's masks at batch {m['batch']}: fill {m['fill']['p50_ms']:.1f} ms (p90 {m['fill']['p90_ms']:.1f}), "
          f"apply {m['apply']['p50_ms']:.1f} ms (p90 {m['apply']['p90_ms']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
