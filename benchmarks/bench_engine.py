"""Engine-core benchmark (issue #2), all figures from one run so that the ratios are fair.

(a) throughput of N requests with mixed prompt/output lengths: our engine vs HF transformers batched
    `generate` on the same requests (left-padded batches; each batch runs to its longest output and
    only the requested tokens count);
(b) time to first token for a prompt with a shared 1,024-token prefix, cold cache vs warm;
(c) peak RSS of the process after our engine's runs (before HF is loaded).

    python benchmarks/bench_engine.py [--model builtin:smollm2-135m-instruct] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import sys
import time

import torch
from tqdm import tqdm

from sglang_gw.engine import Engine, SamplingParams


def make_workload(n: int, vocab: int, seed: int, in_range=(32, 512), out_range=(16, 256)):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    outs = [rng.randint(*out_range) for _ in range(n)]
    return prompts, outs


def run_ours(engine: Engine, prompts, out_lens) -> float:
    async def run():
        bar = tqdm(total=len(prompts), desc="sglang-gw engine", unit="req", file=sys.stderr)

        async def one(p, n):
            params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
            async for out in engine.generate_stream(p, params):
                if out.finished:
                    bar.update(1)
                    return out

        results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, out_lens)))
        bar.close()
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - start
    assert [len(r.output_ids) for r in results] == out_lens
    return elapsed


def run_hf(model_dir, prompts, out_lens, batch_size: int, device: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for b in tqdm(range(0, len(prompts), batch_size), desc="HF generate", unit="batch", file=sys.stderr):
            batch, lens = prompts[b : b + batch_size], out_lens[b : b + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def measure_ttft(engine: Engine, vocab: int, repeats: int = 3) -> tuple[float, float]:
    """Median TTFT (seconds) cold and warm for prompts sharing a 1,024-token prefix."""
    rng = random.Random(1)
    cold, warm = [], []
    params = SamplingParams(max_new_tokens=1, temperature=0)
    for _ in range(repeats):
        prefix = [rng.randrange(100, vocab) for _ in range(1024)]
        first, second = prefix + [rng.randrange(100, vocab) for _ in range(16)], prefix + [rng.randrange(100, vocab) for _ in range(16)]
        cold.append(engine.generate(first, params)[0].time_to_first_token)
        out = engine.generate(second, params)[0]
        assert out.cached_tokens >= 1024
        warm.append(out.time_to_first_token)
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-batch-sizes", default="64,16", help="HF generate batch sizes to compare against")
    ap.add_argument("--kv-cache-gib", type=float, default=3.0)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    engine = Engine(model=args.model, device=args.device, dtype=args.dtype, num_threads=args.threads,
                    kv_cache_gib=args.kv_cache_gib, max_running_requests=args.requests)
    vocab = engine.model.config.vocab_size
    prompts, out_lens = make_workload(args.requests, vocab, seed=0)
    engine.generate(prompts[0][:64], SamplingParams(max_new_tokens=4))  # warm-up
    engine.run_when_idle(engine.cache.reset)

    ours = run_ours(engine, prompts, out_lens)
    cold, warm = measure_ttft(engine, vocab)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    stats = engine.scheduler.stats
    engine.shutdown()

    gen_tokens, in_tokens = sum(out_lens), sum(len(p) for p in prompts)
    print(f"\nworkload: {args.requests} requests, prompts {in_tokens} tokens (32-512 each), "
          f"outputs {gen_tokens} tokens (16-256 each), model {args.model}, {args.dtype}, {args.device}, "
          f"{args.threads} threads")
    print(f"(a) sglang-gw engine: {ours:.1f} s, {gen_tokens / ours:.1f} output tok/s, "
          f"{(gen_tokens + in_tokens) / ours:.1f} total tok/s (retractions: {stats.retractions})")
    for batch_size in [] if args.skip_hf else [int(b) for b in args.hf_batch_sizes.split(",")]:
        hf = run_hf(engine.model_path, prompts, out_lens, batch_size, args.device)
        print(f"    HF generate, batches of {batch_size}: {hf:.1f} s, {gen_tokens / hf:.1f} output tok/s; "
              f"throughput ratio (ours / HF): {hf / ours:.2f}x", flush=True)
    print(f"(b) TTFT with a shared 1,024-token prefix: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms, "
          f"warm is {cold / warm:.1f}x faster")
    print(f"(c) peak RSS after the engine runs: {peak_rss_gib:.2f} GiB "
          f"(KV pool {engine.pool.size * engine.pool.layout.bytes_per_token() / (1 << 30):.2f} GiB)")


if __name__ == "__main__":
    main()
