"""The GPU engine path (issue 15): the CUDA tests, then decode and prefill throughput of the engine's
forward steps next to the hardware's rooflines.

    python benchmarks/bench_gpu.py            # a CUDA machine; about 3-5 minutes on an H200
    python benchmarks/bench_gpu.py --smoke    # CPU: a tiny model, Triton's interpreter; the plumbing only

Models: the embedded SmolLM2-135M (where it is installed) and a randomly initialised Llama-3-8B-shaped
model in bf16, built here (no download). Each runs decode at batch sizes 1, 16, 64, 256 over a
DECODE_CONTEXT-token context per request, with the `triton` backend replayed from CUDA graphs, the same
eagerly, and the `torch` backend eagerly; and prefill of PROMPT_TOKENS-token prompts for the same numbers
of requests, in steps of at most PREFILL_STEP_TOKENS tokens (as max_prefill_tokens cuts them).

Steps are driven directly (backend.prepare + forward on a filled KV pool and request table), without the
scheduler or sampling: what is measured is the GPU path itself. Rooflines: decode tokens/s if each step
only streamed the weights and the batch's KV once at the measured copy bandwidth of this device; prefill
tokens/s if every FLOP of the matmuls and attention ran at the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 16, 64, 256)
DECODE_CONTEXT = 1024
PROMPT_TOKENS = 256
PREFILL_STEP_TOKENS = 8192
DECODE_STEPS = 10


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: torch.dtype
    batch_sizes: tuple[int, ...]
    decode_context: int
    prompt_tokens: int
    decode_steps: int
    copy_bytes: int  # bandwidth probe
    matmul_size: int  # FLOP-rate probe
    tests: tuple[str, ...]


FULL = Plan("cuda", torch.bfloat16, BATCH_SIZES, DECODE_CONTEXT, PROMPT_TOKENS, DECODE_STEPS, 1 << 30, 8192,
            ("tests/test_cuda.py", "tests/test_triton_attention.py"))
# The interpreter runs each Triton program in Python: tiny shapes, one step; the kernels' tests (test_cuda.py
# would only skip without CUDA).
SMOKE = Plan("cpu", torch.float32, (1, 4), 48, 16, 1, 64 << 20, 512, ("tests/test_triton_attention.py",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny model, Triton interpreter")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU plumbing check")
    if plan.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the backend, below)
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: the plumbing needs no more
    started = time.perf_counter()
    if not args.skip_tests:
        run_tests(plan)
    with torch.inference_mode():
        bandwidth, flops = measure_bandwidth(plan), measure_matmul(plan)
        print(f"\nmeasured: copy bandwidth {bandwidth / 1e9:.0f} GB/s, {str(plan.dtype)[6:]} matmul "
              f"{flops / 1e12:.3g} TFLOP/s")
        for name, build in models(plan):
            model = build()
            if model is not None:
                bench_model(name, model, plan, bandwidth, flops)
            del model
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def run_tests(plan: Plan) -> None:
    print("== tests:", " ".join(plan.tests), flush=True)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan.tests], cwd=REPO,
                         capture_output=True, text=True)
    print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:])
    if run.returncode not in (0, 5):  # 5: everything skipped
        print(run.stdout[-6000:])
        sys.exit(f"tests failed (pytest exit {run.returncode}): no figures from a broken build")


def sync(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def timed(plan: Plan, fn, repeat: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(plan)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(plan)
    return (time.perf_counter() - start) / repeat


def measure_bandwidth(plan: Plan) -> float:
    """Bytes per second a device-to-device copy moves (read + write)."""
    src = torch.empty(plan.copy_bytes, dtype=torch.uint8, device=plan.device)
    dst = torch.empty_like(src)
    return 2 * plan.copy_bytes / timed(plan, lambda: dst.copy_(src), repeat=10)


def measure_matmul(plan: Plan) -> float:
    n = plan.matmul_size
    a = torch.randn(n, n, dtype=plan.dtype, device=plan.device)
    b = torch.randn(n, n, dtype=plan.dtype, device=plan.device)
    return 2 * n**3 / timed(plan, lambda: a @ b, repeat=5)


# ---- models ---------------------------------------------------------------------------------------------

def models(plan: Plan):
    """(name, builder) pairs; a builder returns None (after saying why) where the model is unavailable."""
    from sglang_gw.engine.models.config import ModelConfig, RopeConfig

    llama3_8b = ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position=8192,
        rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0), tie_word_embeddings=False, qkv_bias=False,
        qk_norm=False, eos_token_ids=(),
    )
    if plan.device == "cpu":
        tiny = replace(llama3_8b, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position=512)
        return [("tiny-llama (random)", lambda: random_model(tiny, plan))]
    return [("smollm2-135m (embedded)", lambda: embedded_model(plan)),
            ("llama3-8b-shaped (random)", lambda: random_model(llama3_8b, plan))]


def embedded_model(plan: Plan):
    from sglang_gw.engine.models.builtin import resolve_model_path
    from sglang_gw.engine.models.llama import load_model

    try:
        path = resolve_model_path("builtin:smollm2-135m-instruct")
    except Exception as exc:  # the package is not installed here: say so, bench the rest
        print(f"\n== smollm2-135m: skipped ({exc})")
        return None
    return load_model(path, plan.dtype, torch.device(plan.device))


def random_model(config, plan: Plan):
    """A model of `config`'s shapes with N(0, 0.02) weights, made on the device (HF's names)."""
    from sglang_gw.engine.models.llama import LlamaForCausalLM

    c = config
    q, kv, hidden, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    per_layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                 "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                 "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                 "mlp.down_proj": (hidden, inter)}
    shapes = {"model.embed_tokens.weight": (c.vocab_size, hidden), "lm_head.weight": (c.vocab_size, hidden),
              "model.norm.weight": (hidden,)}
    shapes.update({f"model.layers.{i}.{name}.weight": shape for i in range(c.num_layers)
                   for name, shape in per_layer.items()})
    weights = {name: torch.randn(shape, dtype=plan.dtype, device=plan.device) * 0.02 for name, shape in shapes.items()}
    return LlamaForCausalLM(c, weights, plan.dtype, torch.device(plan.device))


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every layer's weights, the final norm and the LM head (the embedding
    table is only gathered from)."""
    tensors = [model.norm, model.lm_head.weight]
    for layer in model.layers:
        tensors += [layer.input_norm, layer.post_norm, layer.qkv.weight, layer.o_proj.weight, layer.gate_up.weight,
                    layer.down.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- one model ------------------------------------------------------------------------------------------

class Workload:
    """A KV pool and request table holding max(batch sizes) requests of decode_context tokens each."""

    def __init__(self, model, plan: Plan, backend: str):
        from sglang_gw.engine.attention import create_attention_backend
        from sglang_gw.engine.kv_pool import KVLayout, KVPool, ReqToTokenTable

        c = model.config
        self.plan, self.model = plan, model
        requests = max(plan.batch_sizes)
        capacity = max(plan.decode_context, plan.prompt_tokens) + 1
        self.layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, plan.dtype)
        self.pool = KVPool(self.layout, requests * capacity, torch.device(plan.device))
        self.table = ReqToTokenTable(requests, capacity, torch.device(plan.device))
        for row in range(requests):
            assert self.table.alloc() == row
            self.table.table[row, :] = self.pool.alloc(capacity)
        self.attn = create_attention_backend(backend, self.pool, self.table)
        self.vocab = c.vocab_size

    def decode_batch(self, batch: int):
        from sglang_gw.engine.batch import ForwardBatch

        device, context = self.plan.device, self.plan.decode_context
        rows = list(range(batch))
        return ForwardBatch(
            is_decode=True, input_ids=torch.randint(0, self.vocab, (batch,), device=device),
            positions=torch.full((batch,), context, dtype=torch.int64, device=device),
            out_slots=self.table.table[rows, context], rows=rows, seq_lens=[context + 1] * batch,
            extend_lens=[1] * batch, logits_index=torch.arange(batch, device=device),
        )

    def prefill_batches(self, requests: int) -> list:
        """requests prompts of prompt_tokens tokens, as extend steps of at most PREFILL_STEP_TOKENS tokens."""
        from sglang_gw.engine.batch import ForwardBatch

        device, prompt = self.plan.device, self.plan.prompt_tokens
        per_step = max(1, PREFILL_STEP_TOKENS // prompt)
        batches = []
        for first in range(0, requests, per_step):
            rows = list(range(first, min(first + per_step, requests)))
            n = len(rows)
            batches.append(ForwardBatch(
                is_decode=False, input_ids=torch.randint(0, self.vocab, (n * prompt,), device=device),
                positions=torch.arange(prompt, device=device).repeat(n),
                out_slots=self.table.table[rows, :prompt].flatten(), rows=rows, seq_lens=[prompt] * n,
                extend_lens=[prompt] * n, logits_index=torch.arange(1, n + 1, device=device) * prompt - 1,
            ))
        return batches

    def step(self, step_model, batch) -> None:
        self.attn.prepare(batch)
        step_model.forward(batch, self.attn)


def bench_model(name: str, model, plan: Plan, bandwidth: float, flops: float) -> None:
    weights = weight_bytes(model)
    print(f"\n== {name}: {weights / 2**30:.2f} GiB of weights read per decode step")
    print(f"{'phase':8} {'backend':16} {'batch':>5} {'tok/s':>10} {'roofline':>10} {'of roof':>7}")
    if plan.device == "cuda":
        bench_backend(model, plan, "triton", weights, bandwidth, flops, graphs=True)
    else:
        print(f"{'decode':8} {'triton+graphs':16} skipped: CUDA graphs need a CUDA device")
    for backend in ("triton", "torch"):
        bench_backend(model, plan, backend, weights, bandwidth, flops, graphs=False)
    sys.stdout.flush()


def bench_backend(model, plan: Plan, backend: str, weights: int, bandwidth: float, flops: float, graphs: bool) -> None:
    """Decode, replayed from CUDA graphs or eager, and (eager) prefill through one attention backend. Its KV
    pool, graphs included, is freed on return, before the next one is allocated."""
    work = Workload(model, plan, backend)
    if graphs:
        from sglang_gw.engine.cuda_graphs import GraphedModel

        bench_decode(work, GraphedModel(model, work.attn, list(plan.batch_sizes)), backend + "+graphs", weights,
                     bandwidth)
        return  # prefill does not use graphs: measured with the eager runs
    bench_decode(work, model, backend, weights, bandwidth)
    bench_prefill(work, backend, weights, flops)


def bench_decode(work: Workload, step_model, label: str, weights: int, bandwidth: float) -> None:
    plan = work.plan
    for batch in plan.batch_sizes:
        fb = work.decode_batch(batch)
        seconds = timed(plan, lambda: work.step(step_model, fb), repeat=plan.decode_steps)
        kv_read = batch * (plan.decode_context + 1) * work.layout.bytes_per_token()
        report("decode", label, batch, batch / seconds, roofline=batch * bandwidth / (weights + kv_read))


def bench_prefill(work: Workload, label: str, weights: int, flops: float) -> None:
    plan, c = work.plan, work.model.config
    # 2 FLOPs per weight per token, the LM head's once per prompt (only the last token's logits), plus
    # QK and PV over the causal half of the prompt.
    head = work.model.lm_head.weight.numel()
    per_token = (2 * (weights / work.layout.dtype.itemsize - head) + 2 * head / plan.prompt_tokens
                 + 4 * c.num_layers * c.num_heads * c.head_dim * plan.prompt_tokens / 2)
    for requests in plan.batch_sizes:
        batches = work.prefill_batches(requests)
        seconds = timed(plan, lambda: [work.step(work.model, b) for b in batches], repeat=1)
        report("prefill", label, requests, requests * plan.prompt_tokens / seconds, roofline=flops / per_token)


def report(phase: str, label: str, batch: int, tokens_per_s: float, roofline: float) -> None:
    print(f"{phase:8} {label:16} {batch:5d} {tokens_per_s:10.0f} {roofline:10.0f} {tokens_per_s / roofline:7.0%}",
          flush=True)


if __name__ == "__main__":
    main()
