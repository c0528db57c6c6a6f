"""Where one engine step spends its time (issue #10): a prefill step and decode steps, offline.

Prints (1) the torch profiler's top operators for one full prefill step (max_prefill_tokens of 64 mixed
prompts) and for decode steps with 64 requests running, and (2) the time of one decode step against
the batch size (1 … 64 requests of 150-token prompts). The C++ decode kernel is not a torch operator:
the profiler shows it as the gap between its total and the step time.

    python benchmarks/profile_engine.py [--threads 2] [--attention-backend cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sglang_gw.engine import Engine, SamplingParams
from sglang_gw.engine.request import Req


def queue(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> None:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.scheduler.add(Req(f"p{i}-{time.monotonic_ns()}", prompt, params, tokenizer=engine.tokenizer,
                                 eos_token_ids=(), on_output=lambda out: None))


def timed_steps(engine: Engine, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.scheduler.step()
    return (time.perf_counter() - start) / steps


def profiled(engine: Engine, steps: int, title: str) -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = timed_steps(engine, steps)
    print(f"\n== {title}: {seconds * 1e3:.0f} ms per step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def drain(engine: Engine) -> None:
    while engine.scheduler.has_work():
        engine.scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    engine = Engine(model=args.model, num_threads=args.threads, attention_backend=args.attention_backend,
                    dtype=args.dtype)
    engine.shutdown()  # this script steps the scheduler itself, on this thread
    vocab, rng = engine.model.config.vocab_size, random.Random(0)

    def prompts(n: int, lo: int, hi: int) -> list[list[int]]:
        return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]

    queue(engine, prompts(64, 30, 260), max_new_tokens=100)
    timed_steps(engine, 1)  # warm-up: the first prefill step
    profiled(engine, 1, f"prefill step ({engine.config.prefill_step_tokens} tokens)")
    while engine.scheduler.waiting or engine.scheduler.chunked:
        engine.scheduler.step()
    timed_steps(engine, 3)
    profiled(engine, 3, f"decode, {len(engine.scheduler.running)} requests running")
    drain(engine)

    print("\n== decode step time against batch size (150-token prompts)")
    for batch in (1, 8, 16, 32, 64):
        queue(engine, prompts(batch, 150, 150), max_new_tokens=40)
        while engine.scheduler.waiting or engine.scheduler.chunked:
            engine.scheduler.step()
        timed_steps(engine, 3)
        seconds = timed_steps(engine, 10)
        print(f"batch {batch:3d}: {seconds * 1e3:6.1f} ms per step  {batch / seconds:6.1f} tok/s")
        drain(engine)
    engine.scheduler.check_integrity()
    print(f"\ntorch threads {torch.get_num_threads()}, settings {engine.resolved_settings}")


if __name__ == "__main__":
    main()
