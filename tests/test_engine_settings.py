"""Engine settings are declared once (`sglang_gw.engine.settings`). Walking that declaration: every
setting given in a serve config reaches the engine through the supervisor's argv, as a field or through
`extra_args`, and a value outside its declared range is refused by check-config and by `sglang-gw
engine`, naming the field. A real engine reports every setting as in effect."""

from __future__ import annotations

import json
import os
import subprocess
import typing
import urllib.request
from pathlib import Path

import annotated_types
import pytest

from conftest import free_port, stop_process, wait_http
from sglang_gw.cli import build_parser
from sglang_gw.config import ConfigError, parse_serve_config
from sglang_gw.engine.settings import EngineArgs, EngineConfig, ServerConfig, devices_of, flag, from_flags
from sglang_gw.supervisor.engines import plan_engines

MODEL_DIR = "<model dir>"  # replaced by a real directory in each test

# A valid, non-default value of every setting a serve config's engine group carries.
EXAMPLES = {
    "max_running_requests": 7, "chunked_prefill_size": 256, "max_prefill_tokens": 4096, "schedule_policy": "lpm",
    "batch_log_interval": 2.5, "model": MODEL_DIR, "device": "cuda", "dtype": "bfloat16",
    "max_total_tokens": 5000, "kv_cache_gib": 0.25, "mem_fraction_static": 0.5, "context_length": 1000,
    "sampling_defaults": "openai", "disable_radix_cache": True, "grammar_backend": "none",
    "disable_jump_forward": True, "attention_backend": "torch", "cuda_graph_max_bs": 32, "num_threads": 1,
    "host": "0.0.0.0", "served_model_name": "renamed", "max_queued_requests": 17, "max_request_bytes": 123456,
    "graceful_shutdown_timeout": 3.0,
}
# Invalid values of the settings whose declaration has no range to derive one from.
FREE_FORM_INVALID = {"model": "/no/such/model", "device": "tpu", "host": None, "served_model_name": None}


def test_the_examples_cover_every_declared_setting():
    assert set(EXAMPLES) == set(ServerConfig.model_fields)


def _invalid(name: str):
    """A value just outside the setting's declared range (None: it declares none)."""
    if name in FREE_FORM_INVALID:
        return FREE_FORM_INVALID[name]
    field = ServerConfig.model_fields[name]
    if typing.get_origin(field.annotation) is typing.Literal:
        return "bogus"
    if field.annotation is bool:
        return "maybe"
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            return bound.ge - 1
        if isinstance(bound, annotated_types.Gt):
            return bound.gt
        if isinstance(bound, annotated_types.Lt):
            return bound.lt
    raise AssertionError(f"{name} declares no range: add it to FREE_FORM_INVALID")


def _group(name: str, value, model_dir: str, **more) -> dict:
    group = {"model": model_dir, name: value, **more}
    if value == "cuda" or devices_of(ServerConfig.model_fields[name]) == ("cuda",):  # planning needs no GPU
        group.update(device="cuda", gpus=[0])
    return group


def _enginefrom_flags(group: dict) -> EngineArgs:
    """The settings an engine planned from this group runs with: the supervisor's argv, parsed and
    validated by exactly the code `sglang-gw engine` runs."""
    spec = plan_engines(parse_serve_config({"engines": [group]}))[0]
    assert spec.argv[1:4] == ("-m", "sglang_gw", "engine")
    return from_flags(build_parser().parse_args(list(spec.argv[3:])), EngineArgs, "engine")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_setting_reaches_the_engine_through_the_supervisor_argv(name, tmp_path):
    value = tmp_path.as_posix() if EXAMPLES[name] == MODEL_DIR else EXAMPLES[name]
    assert getattr(_enginefrom_flags(_group(name, value, tmp_path.as_posix())), name) == value
    if not isinstance(value, bool):  # the same value given as an engine flag in extra_args
        group = _group(name, value, tmp_path.as_posix(), extra_args=[flag(name), str(value)])
        del group[name]
        assert getattr(_enginefrom_flags(group), name) == value


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if _invalid(n) is not None))
def test_an_out_of_range_setting_is_refused_naming_the_field(name, tmp_path, capsys):
    bad = _invalid(name)
    with pytest.raises(ConfigError) as refused:
        parse_serve_config({"engines": [_group(name, bad, tmp_path.as_posix())]})
    assert f"engines.0.{name}:" in str(refused.value), str(refused.value)
    if ServerConfig.model_fields[name].annotation is bool:
        return  # a boolean flag takes no value: the command line cannot carry an invalid one
    try:  # `sglang-gw engine` refuses it too, before it loads anything (argparse, the settings, the model)
        args = build_parser().parse_args(["engine", flag(name), str(bad)])
        code = args.func(args)
    except SystemExit as exited:
        code = exited.code
    error = capsys.readouterr().err
    assert code == 2 and (f"{name}:" in error or f"{flag(name)}:" in error or f"{bad}" in error), error


def test_extra_args_that_contradict_a_field_or_carry_a_bad_value_are_refused(tmp_path):
    model = tmp_path.as_posix()
    cases = [
        ({"max_running_requests": 8, "extra_args": ["--max-running-requests", "9"]},
         "extra_args: --max-running-requests 9 contradicts max_running_requests: 8"),
        ({"extra_args": ["--max-running-requests", "0"]}, "engines.0.max_running_requests: Input should be greater"),
        ({"extra_args": ["--mem-fraction-static", "0.5"]}, "mem_fraction_static: applies to cuda engines only"),
        ({"extra_args": ["--log-format", "console"]}, "extra_args: --log-format is set by the supervisor"),
    ]
    for group, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_serve_config({"engines": [dict(group, model=model)]})
    # Agreeing with the field is fine, and the effective config shows the folded value.
    config = parse_serve_config({"engines": [{"model": model, "dtype": "float16", "extra_args": ["--dtype", "float16",
                                                                                                  "--max-prefill-tokens",
                                                                                                  "8192"]}]})
    assert (config.engines[0].dtype, config.engines[0].max_prefill_tokens) == ("float16", 8192)


def test_backend_choices_that_cannot_run_are_refused_naming_the_field(tmp_path, monkeypatch):
    model = tmp_path.as_posix()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="engines.0: attention_backend: triton runs on CUDA devices .* TRITON_INTERPRET"):
        parse_serve_config({"engines": [{"model": model, "attention_backend": "triton"}]})
    with pytest.raises(ConfigError, match="engines.0: cuda_graph_max_bs: CUDA graphs run with attention_backend trit"):
        parse_serve_config({"engines": [{"model": model, "device": "cuda", "gpus": [0], "attention_backend": "torch",
                                         "cuda_graph_max_bs": 8}]})
    assert EngineConfig(device="cuda", attention_backend="triton", cuda_graph_max_bs=8).cuda_graph_max_bs == 8
    assert EngineConfig(device="cuda", attention_backend="torch", cuda_graph_max_bs=0).cuda_graph_max_bs == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on CPU (the tests' way)
    assert EngineConfig(attention_backend="triton").attention_backend == "triton"


def test_a_real_engine_reports_every_setting_in_effect(tiny_models):
    """One engine planned from a config that changes every CPU setting, asked for /get_server_info."""
    group = {name: value for name, value in EXAMPLES.items()  # CUDA's settings and the one that overrides kv_cache_gib
             if "cpu" in devices_of(ServerConfig.model_fields[name]) and name not in ("device", "max_total_tokens")}
    group.update(model=str(tiny_models["llama"]), kv_cache_gib=0.01, base_port=free_port())
    spec = plan_engines(parse_serve_config({"engines": [group]}))[0]
    proc = subprocess.Popen(spec.argv, env=dict(os.environ, **dict(spec.env)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(spec.url + "/health", proc)
        with urllib.request.urlopen(spec.url + "/get_server_info", timeout=10) as resp:
            info = json.loads(resp.read())
    finally:
        stop_process(proc)
    for name in group:
        if name in ServerConfig.model_fields:
            assert info[name] == group[name], (name, info[name], group[name])
    # Settings left to a default are reported as resolved: the pool size kv_cache_gib gives.
    bytes_per_token = 2 * 2 * 16 * 2 * 2  # layers × kv heads × head_dim × (k, v) × bf16 bytes
    assert info["max_total_tokens"] == int(0.01 * (1 << 30)) // bytes_per_token == info["max_total_num_tokens"]
    assert info["mem_fraction_static"] == ServerConfig.model_fields["mem_fraction_static"].default
    assert "api_key" not in info


def test_the_readme_documents_every_setting():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Engine settings"):]
    assert [name for name in ServerConfig.model_fields if f"`{name}`" not in table] == []
