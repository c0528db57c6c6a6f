"""The `sglang-gw` command. Only subcommands that work are offered; `engine` and `serve` arrive later."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import structlog


def _configure_logging(verbose: bool) -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def _cmd_model_import(args) -> int:
    from sglang_gw.engine.models.builtin import ModelNotFoundError, import_builtin

    try:
        path = import_builtin(args.model_id, force=args.force)
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_model_list(args) -> int:
    from sglang_gw.engine.models.builtin import builtin_model_ids

    print("\n".join(builtin_model_ids()))
    return 0


def _cmd_generate(args) -> int:
    from sglang_gw.engine import Engine, EngineConfig, InvalidParamError, SamplingParams
    from sglang_gw.engine.models.builtin import ModelNotFoundError

    try:
        engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                     num_threads=args.threads))
    except (ModelNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prompt = args.prompt if args.raw else engine.apply_chat_template([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            sampling_seed=args.seed)

    async def stream() -> None:
        shown = 0
        async for out in engine.generate_stream(prompt, params):
            print(out.text[shown:], end="", flush=True)
            shown = len(out.text)
        print()

    try:
        asyncio.run(stream())
    except InvalidParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sglang_gw.engine.config import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="sglang-gw", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the embedded models").add_subparsers(dest="model_cmd", required=True)
    imp = model.add_parser("import", help="convert an embedded model into the cache (once)")
    imp.add_argument("model_id", nargs="?", default=DEFAULT_MODEL)
    imp.add_argument("--force", action="store_true", help="convert again even if a valid copy exists")
    imp.set_defaults(func=_cmd_model_import)
    model.add_parser("list", help="list embedded model ids").set_defaults(func=_cmd_model_list)

    gen = sub.add_parser("generate", help="generate once from a prompt with the offline engine")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="an embedded model id or an HF model directory")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
