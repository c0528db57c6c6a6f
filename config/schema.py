"""The `sglang-gw serve` config: one YAML file, validated at start (unknown keys are errors).

Errors name the field path and the reason ("engines.0.gpus: ..."), through the same `validate` as the
gateway's own config. An engine group is the engine's own `ServerConfig` (declared once, in
`sglang_gw.engine.settings`, with its ranges and cross-field rules) plus where its engines run, so
check-config refuses exactly what an engine would refuse at start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..engine.settings import PER_PROCESS, EngineArgs, ServerConfig, add_flags, flag, given_flags
from ..gateway.config import GatewayConfig, GatewaySettings, WorkerConfig, merge_keys_file
from ..validation import ConfigError, Strict, read_yaml, validate


class EngineGroupConfig(ServerConfig):
    """`count` engines of one model (CPU), or one engine per listed GPU (CUDA), with the engine settings."""

    count: int | None = Field(None, ge=1)  # default: 1 on CPU, one per GPU in `gpus` on CUDA
    gpus: list[int | str] | Literal["all"] | None = None  # CUDA_VISIBLE_DEVICES value per engine
    base_port: int = Field(30000, ge=1, le=65535)  # engine i listens on base_port + i
    # More `sglang-gw engine` flags, e.g. ["--max-queued-requests", "256"]: folded into the fields above.
    extra_args: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _fold_extra_args(cls, raw):
        """Parse extra_args with the engine's own flags and fold them into the fields they set, so that
        check-config validates and prints what the engines will run with."""
        if not isinstance(raw, dict) or not raw.get("extra_args"):
            return raw
        args = raw["extra_args"]
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError("extra_args: must be a list of strings")
        parser = _RaisingParser(prog="extra_args", add_help=False)
        add_flags(parser, EngineArgs)
        folded = dict(raw, extra_args=[])
        for name, value in given_flags(parser.parse_args(args), EngineArgs).items():
            if name in PER_PROCESS:
                raise ValueError(f"extra_args: {flag(name)} is set by the supervisor for each engine")
            if name in raw and raw[name] != value:
                raise ValueError(f"extra_args: {flag(name)} {value} contradicts {name}: {raw[name]}")
            folded[name] = value
        return folded

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: str) -> str:
        from ..engine.models.builtin import builtin_model_ids

        if model.startswith("builtin:"):
            if model not in builtin_model_ids():
                raise ValueError(f"unknown embedded model; choose one of {builtin_model_ids()}")
        elif not Path(model).expanduser().is_dir():
            raise ValueError(f"{model!r} is neither an embedded model id nor a directory on this host")
        return model

    @model_validator(mode="after")
    def _placement(self):
        if self.device != self.device_type:
            raise ValueError(f"device: {self.device}: give device: cuda and pin GPUs with gpus: [...]")
        if self.device == "cpu" and self.gpus is not None:
            raise ValueError("gpus: only for device: cuda")
        if self.device == "cuda" and self.gpus is None and self.count is None:
            raise ValueError("gpus: give the GPUs (a list, or 'all') or a count for device: cuda")
        if self.gpus == "all" and not visible_gpus():
            raise ValueError("gpus: 'all' but this host shows no GPU (nvidia-smi, CUDA_VISIBLE_DEVICES)")
        if isinstance(self.gpus, list) and (not self.gpus or len(set(map(str, self.gpus))) != len(self.gpus)):
            raise ValueError("gpus: must be a non-empty list without repeats")
        if isinstance(self.gpus, list) and self.count is not None and self.count != len(self.gpus):
            raise ValueError(f"count: {self.count} does not match the {len(self.gpus)} gpus listed")
        return self

    def engine_args(self, port: int, num_threads: int) -> EngineArgs:
        """One engine's full settings: this group's, plus what the supervisor sets per process."""
        given = self.model_dump(include=set(ServerConfig.model_fields), exclude_unset=True)
        return EngineArgs.model_validate(dict(given, port=port, num_threads=num_threads, log_format="json"))


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(f"extra_args: {message}")


class SupervisorConfig(Strict):
    startup_timeout: float = Field(900.0, gt=0)  # an engine not ready this long after spawn is killed
    restart_backoff: float = Field(1.0, ge=0)  # delay before a restart, doubled per restart in the window
    restart_backoff_max: float = Field(60.0, ge=0)
    max_restarts: int = Field(5, ge=1)  # this many restarts within restart_window ⇒ held out (flapping)
    restart_window: float = Field(300.0, gt=0)
    kill_hung: bool = True  # kill and restart an engine the gateway finds hung (gateway/health.py)
    drain_timeout: float = Field(120.0, gt=0)  # rolling restart: wait this long for in-flight requests
    shutdown_grace: float = Field(30.0, ge=0)  # SIGTERM: in-flight requests get this long to finish
    engine_stop_timeout: float = Field(30.0, gt=0)  # SIGTERM to an engine, then SIGKILL after this long


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, JSON otherwise


class ServeConfig(Strict):
    gateway: GatewaySettings = GatewaySettings()
    engines: list[EngineGroupConfig] = []
    remote_workers: list[WorkerConfig] = []  # engines on other hosts: probed, never restarted by us
    supervisor: SupervisorConfig = SupervisorConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _topology(self):
        if not self.engines and not self.remote_workers and self.gateway.discovery is None:
            raise ValueError("engines: configure local engines, remote_workers or gateway.discovery")
        taken = {self.gateway.port: "gateway.port"}
        for g, group in enumerate(self.engines):
            for i in range(group_size(group)):
                port = group.base_port + i
                if port > 65535:
                    raise ValueError(f"engines.{g}.base_port: engine {i} would listen on port {port} > 65535")
                if port in taken:
                    raise ValueError(f"engines.{g}.base_port: port {port} is already used by {taken[port]}")
                taken[port] = f"engines.{g}"
        names = [w.name or w.url for w in self.remote_workers]
        clash = set(names) & {name for name, *_ in local_engine_names(self)} | {n for n in names if names.count(n) > 1}
        if clash:
            raise ValueError(f"remote_workers: name {sorted(clash)[0]!r} is used twice")
        return self

    def gateway_config(self, local_workers: list[WorkerConfig]) -> GatewayConfig:
        """The gateway's view: its settings plus local engines and remote workers as one worker list."""
        return GatewayConfig(**dict(self.gateway), workers=[*local_workers, *self.remote_workers])


def group_size(group: EngineGroupConfig) -> int:
    if group.count is not None:
        return group.count
    if isinstance(group.gpus, list):
        return len(group.gpus)
    if group.gpus == "all":
        return len(visible_gpus())
    return 1


def visible_gpus() -> list[str]:
    """GPU ids for `gpus: all`: $CUDA_VISIBLE_DEVICES if set, else the GPUs nvidia-smi lists."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def local_engine_names(config: ServeConfig) -> list[tuple[str, int, int]]:
    """(name, group index, index in group) of every local engine, numbered across groups."""
    out = []
    for g, group in enumerate(config.engines):
        for i in range(group_size(group)):
            out.append((f"engine-{len(out)}", g, i))
    return out


def set_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b.0.c=value` (the value parsed as YAML) to the raw config."""
    import yaml

    path, sep, value = assignment.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set {assignment!r}: expected field.path=value")
    keys = path.split(".")
    node = raw
    try:
        for key, next_key in zip(keys, keys[1:]):
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, [] if next_key.isdigit() else {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {path}: {key} is not a section")
        if isinstance(node, list):
            node[int(keys[-1])] = yaml.safe_load(value)
        else:
            node[keys[-1]] = yaml.safe_load(value)
    except (ValueError, IndexError):
        raise ConfigError(f"--set {path}: no such list item") from None


def load_serve_config(path: str | Path, overrides: list[str] = ()) -> ServeConfig:
    raw = read_yaml(path)
    for assignment in overrides:
        set_override(raw, assignment)
    gateway = raw.get("gateway")
    if isinstance(gateway, dict) and gateway.get("auth") is not None:
        raw["gateway"] = dict(gateway, auth=merge_keys_file(path, gateway["auth"], "gateway.auth"))
    return parse_serve_config(raw, str(path))


def parse_serve_config(raw: dict, source: str = "config") -> ServeConfig:
    return validate(ServeConfig, raw, source)
