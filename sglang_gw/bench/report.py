"""What a run measured: the JSON result, its text summary, the side-by-side comparison of several results,
and the PNG (latency CDFs and throughput over time; matplotlib, imported only when a PNG is asked for)."""

from __future__ import annotations

import dataclasses
import datetime
from collections import Counter
from pathlib import Path

import numpy as np

from sglang_gw.bench.runner import BenchConfig, BenchRun

RESULT_VERSION = 1
PERCENTILES = (50, 90, 95, 99)


def latency_samples(run: BenchRun) -> dict[str, np.ndarray]:
    """Seconds, per completed request (ITL: per gap between two chunks with output)."""
    done = [r for r in run.results if r.error is None]
    streamed = [r for r in done if r.chunk_times]
    itl = [np.diff(r.chunk_times) for r in streamed if len(r.chunk_times) > 1]
    return {
        "ttft": np.array([r.ttft for r in streamed]),
        "itl": np.concatenate(itl) if itl else np.array([]),
        # Time per output token after the first: the decode speed one request saw, however it was chunked.
        "tpot": np.array([(r.end - r.chunk_times[0]) / (r.output_tokens - 1) for r in streamed if r.output_tokens > 1]),
        "e2e": np.array([r.end - r.start for r in done]),
    }


def _stats_ms(seconds: np.ndarray) -> dict | None:
    if not len(seconds):
        return None  # not measured (e.g. TTFT without streaming)
    ms = seconds * 1000
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES},
            "max": float(ms.max()), "count": len(ms)}


def _timeline(run: BenchRun, duration: float) -> dict:
    """Completed requests and output tokens per second over the run, in about 60 buckets. A streamed
    request's tokens are spread over its chunks' arrival times; a whole answer's counted when it ends."""
    bucket = max(0.1, round(duration / 60, 1))
    edges = np.arange(0, duration + bucket, bucket)
    done = [r for r in run.results if r.error is None]
    times, weights = [], []
    for r in done:
        chunks = r.chunk_times or (r.end,)
        times.extend(chunks)
        weights.extend([r.output_tokens / len(chunks)] * len(chunks))
    tokens, _ = np.histogram(np.array(times) - run.started, edges, weights=weights)
    completed, _ = np.histogram(np.array([r.end for r in done]) - run.started, edges)
    return {"bucket_s": bucket, "requests_per_s": (completed / bucket).round(3).tolist(),
            "output_tokens_per_s": (tokens / bucket).round(1).tolist()}


def summarize(config: BenchConfig, run: BenchRun) -> dict:
    """The JSON result (README, "sglang-gw bench": its fields)."""
    done = [r for r in run.results if r.error is None]
    duration = max(run.finished - run.started, 1e-9)
    reported_prompt = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    input_tokens = sum(reported_prompt) if reported_prompt else None
    output_tokens = sum(r.output_tokens for r in done)
    with_cache = [r for r in done if r.cached_tokens is not None and r.prompt_tokens]
    cached = sum(r.cached_tokens for r in with_cache)
    errors = Counter(r.error for r in run.results if r.error is not None)
    examples = {}
    for r in run.results:
        if r.error is not None:
            examples.setdefault(r.error, r.error_detail)
    samples = latency_samples(run)
    return {
        "version": RESULT_VERSION,
        "label": config.label or f"{run.backend} {config.url}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "url": config.url, "backend": run.backend, "model": run.model, "stream": config.stream, "seed": config.seed,
        "workload": {"name": config.workload.name, **dataclasses.asdict(config.workload)},
        "load": dataclasses.asdict(config.load),
        "duration_s": duration, "interrupted": run.interrupted,
        "requests": {"sent": len(run.results), "completed": len(done), "errors": len(run.results) - len(done)},
        "errors": dict(errors), "error_examples": examples,
        "tokens": {"input": input_tokens, "output": output_tokens, "cached": cached if with_cache else None,
                   "usage_reported": sum(r.prompt_tokens is not None for r in done)},
        "throughput": {"requests_per_s": len(done) / duration,
                       "input_tokens_per_s": input_tokens / duration if input_tokens is not None else None,
                       "output_tokens_per_s": output_tokens / duration},
        "prefix_cache_hit_rate": cached / sum(r.prompt_tokens for r in with_cache) if with_cache else None,
        "latency_ms": {name: _stats_ms(values) for name, values in samples.items()},
        "client": {"cpu_s": run.client_cpu_s, "cpu_ms_per_request": 1000 * run.client_cpu_s / max(len(run.results), 1)},
        "timeline": _timeline(run, duration),
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(result: dict) -> str:
    req, thr, lat = result["requests"], result["throughput"], result["latency_ms"]
    by_kind = ", ".join(f"{kind}: {count}" for kind, count in sorted(result["errors"].items()))
    lines = [
        (f"{result['label']}: {result['workload']['name']}, {result['backend']} ({result['model'] or 'no model'}), "
         f"{'streamed' if result['stream'] else 'not streamed'}, {_load_text(result)}"),
        f"requests      {req['sent']} sent, {req['completed']} completed, {req['errors']} errors"
        + (f" ({by_kind})" if by_kind else ""),
        f"duration      {result['duration_s']:.2f} s" + (" (interrupted)" if result["interrupted"] else ""),
        (f"throughput    {thr['requests_per_s']:.2f} req/s, {_fmt(thr['input_tokens_per_s'], '.1f')} input tok/s, "
         f"{thr['output_tokens_per_s']:.1f} output tok/s"),
        (f"cache hits    {_fmt(result['prefix_cache_hit_rate'], '.1%')} of input tokens "
         f"({_fmt(result['tokens']['cached'], ',')} of {_fmt(result['tokens']['input'], ',')})"),
    ]
    for name, title in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E")):
        s = lat[name]
        lines.append(f"{title:<14}" + ("-" if s is None else f"mean {s['mean']:.1f}  p50 {s['p50']:.1f}  "
                                       f"p90 {s['p90']:.1f}  p99 {s['p99']:.1f}  max {s['max']:.1f} ms"))
    lines.append(f"client CPU    {result['client']['cpu_s']:.2f} s, {result['client']['cpu_ms_per_request']:.3f} ms/request")
    for kind, detail in sorted(result["error_examples"].items()):
        lines.append(f"first {kind}: {detail}")
    return "\n".join(lines)


def _load_text(result: dict) -> str:
    load, unit = result["load"], "conversations" if result["workload"]["name"] == "multi-turn" else "requests"
    if load["concurrency"] is not None:
        return f"closed loop, {load['concurrency']} {unit} at once"
    cap = f", at most {load['max_concurrency']} requests in flight" if load["max_concurrency"] else ""
    return f"open loop, {load['request_rate']} {unit}/s{cap}"


# (title, where it is in a result, format, which way is better)
COMPARED = [
    ("requests/s", ("throughput", "requests_per_s"), ",.2f", "higher"),
    ("input tok/s", ("throughput", "input_tokens_per_s"), ",.1f", "higher"),
    ("output tok/s", ("throughput", "output_tokens_per_s"), ",.1f", "higher"),
    *[(f"{title} {q} ms", ("latency_ms", name, q), ",.1f", "lower")
      for name, title in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E")) for q in ("p50", "p99")],
    ("cache hit rate", ("prefix_cache_hit_rate",), ".3f", "higher"),
    ("errors", ("requests", "errors"), ",", "lower"),
    ("client CPU ms/req", ("client", "cpu_ms_per_request"), ".3f", "lower"),
]


def _dig(result: dict, path: tuple[str, ...]):
    """The value at `path`, None where a part is missing or not measured (a latency without streaming)."""
    for key in path:
        result = (result or {}).get(key)
    return result


def compare(results: list[dict], names: list[str]) -> str:
    """A table: one column per result, then each result's ratio to the first (result / first)."""
    heads = names + [f"{n} / {names[0]}" for n in names[1:]]
    width = max(14, *(len(h) + 2 for h in heads))
    lines = [f"{'':20}" + "".join(f"{h:>{width}}" for h in heads) + "   better",
             f"{'workload':20}" + "".join(f"{r['workload']['name']:>{width}}" for r in results)]
    for title, path, spec, better in COMPARED:
        values = [_dig(r, path) for r in results]
        cells = [_fmt(v, spec) for v in values]
        base = values[0]
        cells += [f"{v / base:.2f}x" if base and v is not None else "-" for v in values[1:]]
        lines.append(f"{title:20}" + "".join(f"{c:>{width}}" for c in cells) + f"   {better}")
    return "\n".join(lines)


def write_png(run: BenchRun, result: dict, path: Path) -> None:
    """Latency CDFs (TTFT, ITL, E2E) and throughput over time, in one image."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    samples = latency_samples(run)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (name, title) in zip(axes.flat, (("ttft", "time to first token"), ("itl", "inter-token latency"),
                                             ("e2e", "end-to-end latency"))):
        values = np.sort(samples[name]) * 1000
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values))
        ax.set(title=f"{title} (CDF)", xlabel="ms", ylabel="fraction of requests" if name != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
    timeline = result["timeline"]
    ax = axes[1, 1]
    x = np.arange(len(timeline["output_tokens_per_s"])) * timeline["bucket_s"]
    ax.plot(x, timeline["output_tokens_per_s"], label="output tok/s")
    ax.set(title="throughput over time", xlabel="s since start", ylabel="output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(x, timeline["requests_per_s"], color="tab:orange", label="requests/s")
    ax2.set_ylabel("completed requests/s")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{result['label']}: {result['workload']['name']}, {_load_text(result)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
