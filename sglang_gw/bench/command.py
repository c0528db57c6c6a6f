"""The `sglang-gw bench` flags and what the command does with them. Importing this stays cheap (the
parser is built for every `sglang-gw` command): the client, numpy and matplotlib load when it runs."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

from sglang_gw.bench.workloads import WORKLOADS, LengthRange, settings_of

# Flags that set a workload's fields (default None: the workload's own default; refused where it has no such field).
WORKLOAD_FLAGS = {
    "num_requests": "requests (random, structured)",
    "input_len": "words of new input per request: N or LOW:HIGH (the server's usage counts the tokens)",
    "output_len": "max_tokens: N or LOW:HIGH (exactly that many, ignore_eos, except structured)",
    "groups": "shared-prefix: distinct system prompts",
    "group_size": "shared-prefix: requests per system prompt",
    "system_len": "words of each system prompt (shared-prefix, multi-turn)",
    "conversations": "multi-turn: conversations",
    "turns": "multi-turn: turns per conversation",
    "system_prompts": "multi-turn: distinct system prompts (tenants); conversation i gets prompt i mod N",
    "think_time": "multi-turn: seconds between an answer and the next turn",
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)  # "inf": every session at once
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return value


def _length(text: str) -> LengthRange:
    try:
        return LengthRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


FLAG_TYPES = {"input_len": (_length, "N|LOW:HIGH"), "output_len": (_length, "N|LOW:HIGH"),
              "think_time": (_non_negative, "SECONDS")}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (gateway, engine, vLLM, SGLang)")
    parser.add_argument("--backend", default="auto", choices=["auto", "openai-chat", "openai-completions", "sglang"],
                        help="the API: auto = openai-chat where /v1/models answers, else sglang (/generate)")
    parser.add_argument("--model", default=None, help="default: the first model of GET /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as Authorization: Bearer (default: $OPENAI_API_KEY)")
    parser.add_argument("--workload", default="random", choices=list(WORKLOADS))
    group = parser.add_argument_group("workload settings (defaults: the workload's; see README)")
    for name, help_text in WORKLOAD_FLAGS.items():
        kind, metavar = FLAG_TYPES.get(name, (_positive_int, "N"))
        group.add_argument("--" + name.replace("_", "-"), type=kind, metavar=metavar, default=None, help=help_text)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive_int, default=None,
                      help="closed loop: sessions at once (default 8 without --request-rate)")
    load.add_argument("--request-rate", type=_rate, default=None,
                      help="open loop: sessions started per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=_positive_int, default=None,
                        help="open loop: most requests in flight")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="stream the answers (TTFT and ITL are measured only then)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sent with every request (default: none, the server's default applies)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed sends the same prompts")
    parser.add_argument("--timeout", type=_rate, default=600.0, help="seconds per request")
    parser.add_argument("--label", default=None, help="the run's name in comparisons (default: backend and URL)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON result (default: bench-WORKLOAD-TIME.json here)")
    parser.add_argument("--png", type=Path, default=None, help="also draw latency CDFs and throughput over time")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RESULT.json", default=None,
                        help="print two or more JSON results side by side with ratios to the first; sends nothing")


def run_command(args: argparse.Namespace, error) -> int:
    """`error(message)` is the subcommand's argparse error (exits 2, naming the flag)."""
    if args.compare is not None:
        return _compare(args.compare, error)
    config = _config(args, error)

    import uvloop

    from sglang_gw.bench.report import format_summary, summarize, write_png
    from sglang_gw.bench.runner import DetectError, run_bench

    try:
        run = uvloop.run(run_bench(config, progress=sys.stderr.isatty()))
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = summarize(config, run)
    print(format_summary(result))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or Path(f"bench-{config.workload.name}-{stamp}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"result: {output}")
    if args.png is not None:
        write_png(run, result, args.png)
        print(f"plot: {args.png}")
    if run.interrupted:
        return 130  # as a shell reports a command ended by Ctrl-C
    return 0 if result["requests"]["completed"] else 1


def _config(args: argparse.Namespace, error):
    from sglang_gw.bench.runner import BenchConfig, Load

    workload_class = WORKLOADS[args.workload]
    accepted = settings_of(workload_class)
    given = {name: getattr(args, name) for name in WORKLOAD_FLAGS if getattr(args, name) is not None}
    for name in given:
        if name not in accepted:
            error(f"--{name.replace('_', '-')}: not a setting of --workload {args.workload} (its settings: "
                  + ", ".join("--" + a.replace("_", "-") for a in accepted) + ")")
    for flag, path in (("--output", args.output), ("--png", args.png)):
        if path is not None and not path.resolve().parent.is_dir():  # found out now, not after the run
            error(f"{flag}: {path.parent} is not a directory")
    if args.png is not None and importlib.util.find_spec("matplotlib") is None:
        error("--png: needs matplotlib (pip install 'sglang-gw[bench]')")
    try:
        load = Load(concurrency=None if args.request_rate is not None else args.concurrency or 8,
                    request_rate=args.request_rate, max_concurrency=args.max_concurrency)
    except ValueError as exc:  # Load's rules: with one of --concurrency and --request-rate, only this one can fail
        error(f"--max-concurrency: {exc}")
    return BenchConfig(url=args.url, workload=workload_class(**given), load=load, backend=args.backend,
                       model=args.model, api_key=args.api_key, stream=args.stream, seed=args.seed,
                       timeout_s=args.timeout, temperature=args.temperature, label=args.label)


def _compare(paths: list[Path], error) -> int:
    from sglang_gw.bench.report import compare

    if len(paths) < 2:
        error("--compare: give two or more JSON results")
    results = []
    for path in paths:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            error(f"--compare: {path}: {exc}")
        if not isinstance(results[-1], dict) or "throughput" not in results[-1]:
            error(f"--compare: {path}: not a `sglang-gw bench` result")
    labels = [r.get("label") for r in results]
    names = labels if len(set(labels)) == len(labels) and all(labels) else [p.stem for p in paths]
    print(compare(results, names))
    return 0
