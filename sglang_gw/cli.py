"""The `sglang-gw` command: serve (supervisor + gateway + engines), engine, gateway, and tools."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sglang_gw.logs import configure_logging
from sglang_gw.validation import ConfigError


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
    from sglang_gw.engine import Engine, InvalidParamError, SamplingParams
    from sglang_gw.engine.models.builtin import ModelNotFoundError
    from sglang_gw.engine.settings import EngineConfig, from_flags

    try:
        engine = Engine(from_flags(args, EngineConfig, "sglang-gw generate"))
    except (ModelNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prompt = args.prompt if args.raw else engine.apply_chat_template([{"role": "user", "content": args.prompt}])

    async def stream() -> None:
        shown = 0
        async for out in engine.generate_stream(prompt, params):
            print(out.text[shown:], end="", flush=True)
            shown = len(out.text)
        print()

    try:
        # Without --temperature, the engine's default applies (from_dict leaves a None unset).
        params = SamplingParams.from_dict({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                           "sampling_seed": args.seed})
        asyncio.run(stream())
    except InvalidParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()
    return 0


def _serve(main, port_setting: str) -> int:
    """Run a server's main coroutine; an address it cannot listen on is an error naming the setting to
    change, not a traceback."""
    import uvloop

    from sglang_gw.serving import CannotListen

    try:
        return uvloop.run(main)
    except CannotListen as exc:
        print(f"error: {port_setting}: {exc}", file=sys.stderr)
        return 1


def _cmd_engine(args) -> int:
    import os

    from sglang_gw.engine.models.builtin import ModelNotFoundError, resolve_model_path
    from sglang_gw.engine.server import run_engine_server
    from sglang_gw.engine.settings import EngineArgs, from_flags

    if getattr(args, "api_key", None) is None and os.environ.get("SGLANG_GW_API_KEY"):
        args.api_key = os.environ["SGLANG_GW_API_KEY"]
    try:
        settings = from_flags(args, EngineArgs, "sglang-gw engine")
        resolve_model_path(settings.model)  # fail before binding the port: a missing model is fatal
    except (ConfigError, ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _serve(run_engine_server(settings), "--port")


def _cmd_gateway(args) -> int:
    from sglang_gw.gateway.app import run_gateway
    from sglang_gw.gateway.config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _serve(run_gateway(config), "port")


def _cmd_serve(args) -> int:
    from sglang_gw.config import load_serve_config
    from sglang_gw.supervisor.serve import run_serve

    path = args.config or _default_config()
    try:  # an invalid config exits 2 before anything starts
        config = load_serve_config(path, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging("debug" if args.verbose else config.logging.level, config.logging.format)
    return _serve(run_serve(config, path, args.set), "gateway.port")


def _default_config() -> str:
    from importlib.resources import files

    return str(files("sglang_gw.config") / "default.yaml")


def _cmd_check_config(args) -> int:
    import yaml

    from sglang_gw.config import load_serve_config

    try:
        config = load_serve_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {args.config}: valid. The effective config, defaults included:")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
    return 0


def _cmd_restart(args) -> int:
    """Rolling restart (or one engine) through the running server's admin API."""
    import json
    import os
    import urllib.error
    import urllib.request

    key = args.admin_key or os.environ.get("SGLANG_GW_ADMIN_KEY", "")
    path = f"/admin/engines/{args.engine}/restart" if args.engine else "/admin/engines/restart?wait=true"
    request = urllib.request.Request(args.url.rstrip("/") + path, method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            print(json.dumps(json.loads(resp.read()), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
    except (urllib.error.URLError, TimeoutError) as exc:
        print(f"error: {args.url}: {exc}", file=sys.stderr)
    return 1


def _cmd_key_create(args) -> int:
    import yaml

    from sglang_gw.gateway.auth import new_key

    key, digest = new_key()
    entry = {"name": args.name, "hash": digest}
    entry.update({k: v for k, v in (("rpm", args.rpm), ("max_concurrent", args.max_concurrent),
                                    ("models", args.models.split(",") if args.models else None)) if v is not None})
    print(f"key (shown once, store it now): {key}")
    print("add under auth.keys in the gateway config:")
    print(yaml.safe_dump([entry], sort_keys=False).strip())
    return 0


def _cmd_bench(args) -> int:
    from sglang_gw.bench.command import run_command

    return run_command(args, args.bench_parser.error)


def build_parser() -> argparse.ArgumentParser:
    from sglang_gw.engine.settings import DEFAULT_MODEL, EngineArgs, EngineConfig, add_flags

    parser = argparse.ArgumentParser(prog="sglang-gw", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the embedded models").add_subparsers(dest="model_cmd", required=True)
    imp = model.add_parser("import", help="convert an embedded model into the cache (once)")
    imp.add_argument("model_id", nargs="?", default=DEFAULT_MODEL)
    imp.add_argument("--force", action="store_true", help="convert again even if a valid copy exists")
    imp.set_defaults(func=_cmd_model_import)
    model.add_parser("list", help="list embedded model ids").set_defaults(func=_cmd_model_list)

    engine = sub.add_parser("engine", help="serve one engine over HTTP (SGLang native + OpenAI API)")
    add_flags(engine, EngineArgs)
    engine.set_defaults(func=_cmd_engine)

    serve = sub.add_parser("serve", help="supervisor + gateway + engines from one config file")
    serve.add_argument("config", nargs="?", default=None,
                       help="the YAML config (default: the packaged config/default.yaml)")
    serve.add_argument("--set", action="append", default=[], metavar="FIELD.PATH=VALUE",
                       help="override a config field, e.g. --set gateway.port=9000 (repeatable)")
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser("check-config", help="validate a serve config and print it with defaults filled in")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="FIELD.PATH=VALUE")
    check.set_defaults(func=_cmd_check_config)

    restart = sub.add_parser("restart", help="rolling restart of a running server's engines (admin API)")
    restart.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's address")
    restart.add_argument("--engine", default=None, help="restart only this engine (e.g. engine-0)")
    restart.add_argument("--admin-key", default=None, help="default: $SGLANG_GW_ADMIN_KEY")
    restart.add_argument("--timeout", type=float, default=3600)
    restart.set_defaults(func=_cmd_restart)

    gw = sub.add_parser("gateway", help="the load balancer in front of engine workers (config: YAML)")
    gw.add_argument("--config", required=True, help="gateway YAML: workers, policy, health, retries")
    gw.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    gw.set_defaults(func=_cmd_gateway)

    key = sub.add_parser("key", help="gateway API keys").add_subparsers(dest="key_cmd", required=True)
    create = key.add_parser("create", help="print a new key once, and the hash line for the config")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, default=None, help="requests per minute")
    create.add_argument("--max-concurrent", type=int, default=None)
    create.add_argument("--models", default=None, help="comma-separated models the key may use")
    create.set_defaults(func=_cmd_key_create)

    gen = sub.add_parser("generate", help="generate once from a prompt with the offline engine")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 = greedy (default: the model's, see the sampling_defaults setting)")
    gen.add_argument("--seed", type=int, default=None)
    add_flags(gen, EngineConfig)
    gen.set_defaults(func=_cmd_generate)

    from sglang_gw.bench.command import add_flags as add_bench_flags

    bench = sub.add_parser("bench", help="load-test a server (ours, SGLang, vLLM, any OpenAI API): throughput, "
                                         "latencies, cache hits; compare results")
    add_bench_flags(bench)
    bench.set_defaults(func=_cmd_bench, bench_parser=bench)  # its flag errors name the bench flag
    return parser


def main(argv: list[str] | None = None) -> int:
    from sglang_gw.supervisor.lifeline import die_with_supervisor

    die_with_supervisor()  # first: an engine must not outlive a supervisor killed while it starts
    args = build_parser().parse_args(argv)
    if args.func is not _cmd_serve:  # serve configures logging from its config file
        configure_logging("debug" if args.verbose else "info", getattr(args, "log_format", "auto"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
