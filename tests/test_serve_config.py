"""The serve config: a table of invalid configs refused with the field path, overrides, examples, and
the engine command lines the supervisor derives from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sglang_gw.config import ConfigError, load_serve_config, parse_serve_config
from sglang_gw.config.schema import set_override
from sglang_gw.supervisor.engines import plan_engines

REPO = Path(__file__).resolve().parents[1]
HASH = "sha256:" + "0" * 64


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    return str(path)


def _engine(model_dir, **fields):
    return {"model": model_dir, **fields}


COMMAND = [sys.executable, "-m", "server", "--port", "{port}"]  # a command group's template (an executable argv[0])


INVALID = [
    # (config, the start of the message after "config: ")
    ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
    ({"engines": []}, "engines: configure local engines, remote_workers or gateway.discovery"),
    ({"gateway": {"port": 70000}, "engines": [{}]}, "gateway.port: Input should be less than or equal to 65535"),
    ({"gateway": {"policy": {"name": "random"}}, "engines": [{}]}, "gateway.policy.name: unknown routing policy"),
    ({"gateway": {"health": {"interval": 0}}, "engines": [{}]}, "gateway.health.interval: Input should be greater"),
    ({"gateway": {"auth": {"keys": [{"name": "a", "hash": "plain"}]}}, "engines": [{}]},
     "gateway.auth.keys.0.hash: must be 'sha256:'"),
    ({"gateway": {"discovery": {"dns": "x", "family": "ipx"}}}, "gateway.discovery.family: String should match"),
    ({"engines": [{"model": "builtin:nope"}]}, "engines.0.model: unknown embedded model"),
    ({"engines": [{"model": "/no/such/dir"}]}, "engines.0.model: '/no/such/dir' is neither"),
    ({"engines": [{"count": 0}]}, "engines.0.count: Input should be greater than or equal to 1"),
    ({"engines": [{"gpus": [0]}]}, "engines.0: gpus: only for device: cuda"),
    ({"engines": [{"device": "cuda"}]}, "engines.0: gpus: give the GPUs"),
    ({"engines": [{"device": "cuda", "gpus": [0, 0]}]}, "engines.0: gpus: must be a non-empty list without repeats"),
    ({"engines": [{"device": "cuda", "gpus": [0, 1], "count": 3}]}, "engines.0: count: 3 does not match"),
    ({"engines": [{"device": "tpu"}]}, "engines.0.device: must be cpu, cuda or cuda:N"),
    ({"engines": [{"device": "cuda:1"}]}, "engines.0: device: cuda:1: give device: cuda and pin GPUs with gpus"),
    ({"engines": [{"mem_fraction_static": 0.5}]}, "engines.0: mem_fraction_static: applies to cuda engines only"),
    ({"engines": [{"device": "cuda", "count": 1, "kv_cache_gib": 2}]},
     "engines.0: kv_cache_gib: applies to cpu engines only"),
    ({"engines": [{"kv_cache_gib": 2, "max_total_tokens": 4096}]},
     "engines.0: kv_cache_gib: not used when max_total_tokens sizes the KV pool"),
    ({"engines": [{"chunked_prefill_size": 4096, "max_prefill_tokens": 1024}]},
     "engines.0: chunked_prefill_size: 4096 exceeds max_prefill_tokens (1024)"),
    ({"engines": [{"max_running_requests": 0}]}, "engines.0.max_running_requests: Input should be greater"),
    ({"engines": [{"kv_cache_gib": -1}]}, "engines.0.kv_cache_gib: Input should be greater than 0"),
    ({"engines": [{"extra_args": ["--port", "1"]}]}, "engines.0: extra_args: --port is set by the supervisor"),
    ({"engines": [{"extra_args": ["--api-key", "k"]}]}, "engines.0: extra_args: --api-key is set by the supervisor"),
    ({"engines": [{"extra_args": ["--bogus"]}]}, "engines.0: extra_args: unrecognized arguments: --bogus"),
    ({"engines": [{"extra_args": ["--max-queued-requests", "many"]}]},
     "engines.0: extra_args: argument --max-queued-requests: invalid int value: 'many'"),
    ({"engines": [{"extra_args": ["--max-running-requests", "0"]}]},
     "engines.0.max_running_requests: Input should be greater than or equal to 1"),
    ({"engines": [{"dtype": "bfloat16", "extra_args": ["--dtype", "float16"]}]},
     "engines.0: extra_args: --dtype float16 contradicts dtype: bfloat16"),
    ({"engines": [{"count": 2, "base_port": 30000}, {"base_port": 30001}]},
     "engines.1.base_port: port 30001 is already used by engines.0"),
    ({"gateway": {"port": 30000}, "engines": [{}]}, "engines.0.base_port: port 30000 is already used by gateway.port"),
    ({"engines": [{"base_port": 65535, "count": 2}]}, "engines.0.base_port: engine 1 would listen on port 65536"),
    ({"engines": [{}], "remote_workers": [{"url": "ftp://x"}]}, "remote_workers.0.url: must start with http"),
    ({"engines": [{}], "remote_workers": [{"url": "http://x:1", "name": "engine-0"}]},
     "remote_workers: name 'engine-0' is used twice"),
    ({"engines": [{}], "supervisor": {"max_restarts": 0}}, "supervisor.max_restarts: Input should be greater"),
    ({"engines": [{}], "supervisor": {"restart_after": 1}}, "supervisor.restart_after: Extra inputs"),
    ({"engines": [{}], "logging": {"level": "loud"}}, "logging.level: Input should be"),
    # Command groups: the template, and our engine's settings, which another server would ignore.
    ({"engines": [{"command": []}]}, "engines.0.command: empty: give the server's command line"),
    ({"engines": [{"command": [sys.executable, "-m", "server"]}]}, "engines.0.command: no {port} placeholder"),
    ({"engines": [{"command": [*COMMAND, "--gpu", "{gpuu}"]}]},
     "engines.0.command: '{gpuu}': unknown placeholder {gpuu}; the placeholders are {port}, {gpu}"),
    ({"engines": [{"command": [*COMMAND, "--port-offset", "{port:+d}"]}]},
     "engines.0.command: '{port:+d}': unknown placeholder {port:+d}"),
    ({"engines": [{"command": [*COMMAND, "--json", '{"a": 1']}]}, "engines.0.command: '{\"a\": 1': unbalanced braces"),
    ({"engines": [{"command": [*COMMAND, "--x", "a}"]}]}, "engines.0.command: 'a}': unbalanced braces"),
    ({"engines": [{"command": f"{sys.executable} --port '{{port}}"}]},
     "engines.0.command: cannot split it as a shell would: No closing quotation"),
    ({"engines": [{"command": [sys.executable, "--port", {"port": None}]}]},
     "engines.0.command: quote '{port}': YAML reads an unquoted {port} as a mapping"),
    ({"engines": [{"command": ["no-such-server", "--port", "{port}"]}]},
     "engines.0.command: 'no-such-server' is not an executable on this host's PATH"),
    ({"engines": [{"command": [*COMMAND, "--base-gpu-id", "{gpu}"]}]},
     "engines.0: command: {gpu} names the engine's GPU, but this group pins none (give gpus)"),
    ({"engines": [{"command": COMMAND, "gpus": [1, 1]}]}, "engines.0: gpus: must be a non-empty list without repeats"),
    ({"engines": [{"command": COMMAND, "gpus": [0, 1], "count": 3}]}, "engines.0: count: 3 does not match"),
    ({"engines": [{"command": COMMAND, "model": "builtin:smollm2-135m-instruct"}]},
     "engines.0: model: a group runs either our engine (model) or a command, not both"),
    *[({"engines": [{"command": COMMAND, name: value}]},
       (f"engines.0: {name}: a setting of our engine (groups with model); a command group gives its server's own "
        f"flags in command"))
      for name, value in [("kv_cache_gib", 2), ("dtype", "bfloat16"), ("served_model_name", "m"), ("device", "cuda"),
                          ("host", "0.0.0.0"), ("extra_args", ["--dtype", "float16"])]],
    ({"engines": [{"command": COMMAND, "health_path": "health"}]}, "engines.0.health_path: must start with /"),
    ({"engines": [{"command": COMMAND, "startup_timeout": 0}]}, "engines.0.startup_timeout: Input should be greater"),
    ({"engines": [{"command": COMMAND, "health": "/health"}]}, "engines.0.health: Extra inputs are not permitted"),
    ({"engines": [{"command": COMMAND, "base_port": 30000}, {"base_port": 30000}]},
     "engines.1.base_port: port 30000 is already used by engines.0"),
]


@pytest.mark.parametrize("raw,message", INVALID, ids=[m.split(":")[0] for _, m in INVALID])
def test_invalid_configs_are_refused_naming_the_field(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_serve_config(raw)
    assert str(err.value).startswith("config: " + message), str(err.value)


def test_serve_refuses_to_start_on_an_invalid_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"engines": [{"count": 2, "schedule_policy": "random"}]}))
    for command in ("serve", "check-config"):
        done = subprocess.run([sys.executable, "-m", "sglang_gw", command, str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        assert f"error: {path}: engines.0.schedule_policy: Input should be 'fcfs' or 'lpm'" in done.stderr


def test_check_config_prints_the_effective_config_with_overrides(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sglang_gw", "check-config", str(REPO / "config" / "default.yaml"),
                           "--set", "gateway.port=9001", "--set", "engines.0.count=3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["gateway"]["port"] == 9001 and effective["engines"][0]["count"] == 3
    assert effective["supervisor"]["max_restarts"] == 5  # defaults are filled in
    assert effective["engines"][0]["model"] == "builtin:smollm2-135m-instruct"


@pytest.mark.parametrize("name", ["default.yaml", "multi-gpu.yaml", "multi-node.yaml"])
def test_example_configs_are_valid(name, model_dir):
    raw = yaml.safe_load((REPO / "config" / name).read_text())
    for group in raw["engines"]:
        if not group["model"].startswith("builtin:"):
            group["model"] = model_dir  # the examples name model directories of a GPU server
    config = parse_serve_config(raw, name)
    assert config.engines


def test_set_overrides_and_keys_file(tmp_path, model_dir):
    raw = {"engines": [{"model": model_dir}]}
    set_override(raw, "engines.0.count=2")
    set_override(raw, "gateway.health.interval=0.5")
    assert raw == {"engines": [{"model": model_dir, "count": 2}], "gateway": {"health": {"interval": 0.5}}}
    for bad in ("engines.5.count=1", "novalue", "engines.0.count.x=1"):
        with pytest.raises(ConfigError):
            set_override(dict(raw, engines=[{"model": model_dir, "count": 2}]), bad)
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump([{"name": "bob", "hash": HASH}]))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"auth": {"keys_file": "keys.yaml"}}, "engines": [{"model": model_dir}]}))
    assert [k.name for k in load_serve_config(path).gateway.auth.keys] == ["bob"]
    (tmp_path / "keys.yaml").write_text("{not a list: 1}")
    with pytest.raises(ConfigError, match="gateway.auth.keys_file: .* must hold a YAML list"):
        load_serve_config(path)


def test_engine_plan_pins_gpus_and_splits_cpu_cores(model_dir):
    config = parse_serve_config({"engines": [
        {"model": model_dir, "device": "cuda", "gpus": [2, "GPU-abc"], "base_port": 31000,
         "extra_args": ["--max-queued-requests", "7"], "served_model_name": "m"},
        {"model": model_dir, "count": 2, "base_port": 32000, "host": "0.0.0.0"},
    ]})
    specs = plan_engines(config, cores=8)
    assert [s.name for s in specs] == ["engine-0", "engine-1", "engine-2", "engine-3"]
    env = [dict(s.env) for s in specs]
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in env] == ["2", "GPU-abc", None, None]
    assert [e["OMP_NUM_THREADS"] for e in env] == ["2"] * 4  # 8 cores over 4 engines
    argv = specs[1].argv
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--port") + 1] == "31001"
    assert argv[argv.index("--max-queued-requests") + 1] == "7" and "--served-model-name" in argv
    assert config.engines[0].max_queued_requests == 7 and config.engines[0].extra_args == []  # folded in
    assert specs[3].url == "http://127.0.0.1:32001"  # 0.0.0.0 is reached over loopback
    assert specs[3].argv[specs[3].argv.index("--host") + 1] == "0.0.0.0"
    # The plan's flags are ones the engine accepts.
    from sglang_gw.cli import build_parser

    args = build_parser().parse_args(list(specs[0].argv[3:]))
    assert (args.port, args.served_model_name, args.max_queued_requests) == (31000, "m", 7)


def test_command_engine_plan_fills_in_the_template_and_pins_gpus(model_dir):
    config = parse_serve_config({"engines": [
        {"command": f"{sys.executable} -m server --port {{port}} --gpu-id {{gpu}} --json '{{{{\"t\": 0}}}}' --tp 1",
         "gpus": [2, "GPU-abc"], "base_port": 31000, "health_path": "/v1/models", "startup_timeout": 60},
        {"command": COMMAND, "count": 2, "base_port": 32000},
        {"model": model_dir, "base_port": 33000},
    ]})
    specs = plan_engines(config, cores=8)
    assert [s.name for s in specs] == ["engine-0", "engine-1", "engine-2", "engine-3", "engine-4"]
    lifeline = (sys.executable, "-m", "sglang_gw.supervisor.lifeline")
    assert specs[1].argv == (*lifeline, sys.executable, "-m", "server", "--port", "31001", "--gpu-id", "GPU-abc",
                             "--json", '{"t": 0}', "--tp", "1")
    assert specs[3].argv == (*lifeline, *COMMAND[:-1], "32001")
    assert specs[4].argv[1:4] == ("-m", "sglang_gw", "engine")  # our engine, as before
    env = [dict(s.env) for s in specs]
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in env] == ["2", "GPU-abc", None, None, None]
    assert [s.gpu for s in specs] == ["2", "GPU-abc", None, None, None]
    assert [e.get("OMP_NUM_THREADS") for e in env] == [None] * 4 + ["1"]  # a command sets its own threads
    assert [(s.url, s.health_path, s.startup_timeout) for s in specs[::2]] == [
        ("http://127.0.0.1:31000", "/v1/models", 60), ("http://127.0.0.1:32000", "/health", None),
        ("http://127.0.0.1:33000", "/health", None)]


def test_check_config_prints_a_command_group_that_loads_again(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(f"engines:\n  - command: {sys.executable} -m sglang.launch_server --port {{port}} --tp 1\n"
                    f"    startup_timeout: 600\n")
    done = subprocess.run([sys.executable, "-m", "sglang_gw", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["engines"] == [{"count": None, "gpus": None, "base_port": 30000, "startup_timeout": 600,
                                     "command": [sys.executable, "-m", "sglang.launch_server", "--port", "{port}",
                                                 "--tp", "1"], "health_path": "/health"}]
    assert parse_serve_config(effective).engines == parse_serve_config(yaml.safe_load(path.read_text())).engines


def test_serve_and_check_config_refuse_an_invalid_command_template(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"engines": [{"command": [*COMMAND, "--gpu", "{gpuu}"]}]}))
    for command in ("serve", "check-config"):
        done = subprocess.run([sys.executable, "-m", "sglang_gw", command, str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        assert f"error: {path}: engines.0.command: '{{gpuu}}': unknown placeholder {{gpuu}}" in done.stderr


def test_gateway_reload_applies_limits_policy_and_workers_in_place():
    import asyncio

    from sglang_gw.gateway.app import Gateway
    from sglang_gw.gateway.config import parse_config

    base = {"workers": [{"url": "http://127.0.0.1:9", "name": "local"}, {"url": "http://127.0.0.1:10", "name": "r1"}],
            "policy": {"name": "prefix_affinity", "load_margin": 4}}

    async def scenario():
        import aiohttp

        gateway = Gateway(parse_config(base), supervised=frozenset({"local"}))
        gateway.session = aiohttp.ClientSession()  # new listed workers get probed at once
        policy = gateway.policy
        tuned = dict(base, policy={"name": "prefix_affinity", "load_margin": 9}, max_inflight_per_worker=3,
                     workers=[base["workers"][0], {"url": "http://127.0.0.1:11", "name": "r2"}], port=9999)
        assert gateway.reload(parse_config(tuned)) == ["port"]  # the socket cannot move without a restart
        assert gateway.policy is policy and policy.load_margin == 9  # the prefix index survives a retune
        assert gateway.config.max_inflight_per_worker == 3
        assert [(w.name, w.origin) for w in gateway.workers] == [("local", "engine"), ("r2", "config")]
        gateway.reload(parse_config(dict(tuned, policy={"name": "prefix_affinity", "block_size": 32})))
        assert gateway.policy is not policy and gateway.policy.index.block_size == 32
        gateway.reload(parse_config(dict(tuned, policy={"name": "least_conn"}, workers=base["workers"][:1])))
        assert gateway.policy.name == "least_conn"
        assert [w.name for w in gateway.workers] == ["local"]
        await asyncio.sleep(0.2)
        await gateway.session.close()

    asyncio.run(scenario())
