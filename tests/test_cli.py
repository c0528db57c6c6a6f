"""The `sglang-gw` command line: working subcommands, and refusing bad configuration by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_gw.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, field", [
    (["--max-running-requests", "0"], "max_running_requests"),
    (["--dtype", "float8"], "dtype"),
    (["--mem-fraction-static", "1.5"], "mem_fraction_static"),
    (["--chunked-prefill-size", "-1"], "chunked_prefill_size"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_engine_refuses_invalid_config_naming_the_field(args, field):
    result = _cli("engine", *args)
    assert result.returncode == 2
    assert field in result.stderr


def test_model_list_and_generate(tiny_models):
    assert "builtin:smollm2-135m-instruct" in _cli("model", "list").stdout
    result = _cli("generate", "Paris is", "--model", str(tiny_models["qwen2"]), "--raw", "--max-new-tokens", "5",
                  "--temperature", "0", "--num-threads", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text was generated"


@pytest.mark.parametrize("yaml_text, field", [
    ('workers: [{url: "10.0.0.1:30000"}]', "workers.0.url"),
    ('workers: [{url: "http://a:1"}]\npolicy: {name: fastest}', "policy.name"),
    ("workers: []", "workers"),
    ('workers: [{url: "http://a:1"}]\nhealth: {interval: 0}', "health.interval"),
    ('workers: [{url: "http://a:1"}]\nretries: 3', "retries"),
])
def test_gateway_refuses_invalid_config_naming_the_field(tmp_path, yaml_text, field):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml_text)
    result = _cli("gateway", "--config", str(path))
    assert result.returncode == 2
    assert f": {field}:" in result.stderr, result.stderr


def test_key_create_prints_the_key_once_and_only_its_hash_for_the_config(tmp_path):
    import yaml

    from sglang_gw.gateway.auth import hash_key
    from sglang_gw.gateway.config import load_config

    result = _cli("key", "create", "--name", "alice", "--rpm", "10", "--models", "tiny,other")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    entries = yaml.safe_load("\n".join(lines[2:]))
    assert entries == [{"name": "alice", "hash": hash_key(key), "rpm": 10, "models": ["tiny", "other"]}]
    assert key not in "\n".join(lines[1:])
    # The printed entry is valid config, also from a separate keys file.
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(entries))
    (tmp_path / "gateway.yaml").write_text('workers: [{url: "http://a:1"}]\nauth: {keys_file: keys.yaml}\n')
    assert load_config(tmp_path / "gateway.yaml").auth.keys[0].rpm == 10


def test_lean_commands_load_neither_torch_nor_transformers(tmp_path):
    """The gateway, serve's own process, check-config, key and --help never need torch or transformers:
    with both made unimportable, they still work, and importing their modules loads neither."""
    probe = ("import sys\n"
             "import sglang_gw.gateway.app, sglang_gw.supervisor.serve, sglang_gw.config\n"
             "from sglang_gw.cli import build_parser\n"
             "build_parser()\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "[]"
    blocked = "import sys; sys.modules['torch'] = sys.modules['transformers'] = None; from sglang_gw.cli import main; "
    config = Path(__file__).resolve().parents[1] / "config" / "default.yaml"
    for args in (["check-config", str(config)], ["key", "create", "--name", "x"], ["--help"], ["serve", "--help"],
                 ["gateway", "--help"], ["engine", "--help"]):
        done = subprocess.run([sys.executable, "-c", blocked + f"sys.exit(main({args!r}))"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    unreachable = subprocess.run([sys.executable, "-c", blocked + "sys.exit(main(['restart', '--url', 'http://127.0.0.1:9']))"],
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "error: http://127.0.0.1:9" in unreachable.stderr, unreachable.stderr


def test_a_taken_port_is_an_error_naming_the_setting_not_a_traceback(tiny_models, tmp_path):
    import socket

    import yaml

    from sglang_gw.testing import free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    port = taken.getsockname()[1]
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({"port": port, "workers": [{"url": "http://127.0.0.1:9"}]}))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({
        "gateway": {"port": port}, "engines": [{"model": str(tiny_models["llama"]), "base_port": free_port()}]}))
    try:
        for args, setting in [(["gateway", "--config", str(tmp_path / "gateway.yaml")], "port"),
                              (["serve", str(tmp_path / "serve.yaml")], "gateway.port"),
                              (["engine", "--model", str(tiny_models["llama"]), "--port", str(port)], "--port")]:
            result = _cli(*args)
            assert result.returncode == 1, (args, result.stderr)
            assert f"error: {setting}: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
            assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr, result.stderr
    finally:
        taken.close()
