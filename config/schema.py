"""The `sglang-gw serve` config: one YAML file, validated at start (unknown keys are errors).

Errors name the field path and the reason ("engines.0.gpus: ..."), through the same `validate` as the
gateway's own config. An engine group is either our engine — its own `ServerConfig` (declared once, in
`sglang_gw.engine.settings`, with its ranges and cross-field rules), so check-config refuses exactly
what an engine would refuse at start — or a command: a server the user already runs (SGLang, vLLM),
as an argv template. Both carry where their engines run (`Placement`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..engine.settings import PER_PROCESS, EngineArgs, ServerConfig, add_flags, flag, given_flags
from ..gateway.config import GatewayConfig, GatewaySettings, WorkerConfig, merge_keys_file
from ..validation import ConfigError, Strict, read_yaml, validate


class Placement(Strict):
    """Where a group's engines run: how many, pinned to which GPUs, on which ports."""

    count: int | None = Field(None, ge=1)  # default: one per GPU in `gpus`, else 1
    gpus: list[int | str] | Literal["all"] | None = None  # CUDA_VISIBLE_DEVICES value per engine
    base_port: int = Field(30000, ge=1, le=65535)  # engine i listens on base_port + i
    # Seconds from spawn to a 200 from the engine's health path, else killed and restarted.
    startup_timeout: float | None = Field(None, gt=0)  # default: supervisor.startup_timeout

    def gpu(self, i: int) -> str | None:
        """The GPU engine `i` of this group is pinned to (its CUDA_VISIBLE_DEVICES), or None."""
        if self.gpus is None:
            return None
        return str((visible_gpus() if self.gpus == "all" else self.gpus)[i])

    def _check_gpus(self) -> None:
        if self.gpus == "all" and not visible_gpus():
            raise ValueError("gpus: 'all' but this host shows no GPU (nvidia-smi, CUDA_VISIBLE_DEVICES)")
        if isinstance(self.gpus, list) and (not self.gpus or len(set(map(str, self.gpus))) != len(self.gpus)):
            raise ValueError("gpus: must be a non-empty list without repeats")
        if isinstance(self.gpus, list) and self.count is not None and self.count != len(self.gpus):
            raise ValueError(f"count: {self.count} does not match the {len(self.gpus)} gpus listed")


class EngineGroupConfig(Placement, ServerConfig):
    """`count` engines of one model (CPU), or one engine per listed GPU (CUDA), with the engine settings."""

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
        self._check_gpus()
        return self

    def gpu(self, i: int) -> str | None:
        # A CUDA group given as a count takes GPUs 0..count-1.
        return str(i) if self.gpus is None and self.device == "cuda" else super().gpu(i)

    @property
    def served_model(self) -> str | None:
        """The model id clients send, where the config knows it."""
        return self.served_model_name or self.model

    def engine_args(self, port: int, num_threads: int) -> EngineArgs:
        """One engine's full settings: this group's, plus what the supervisor sets per process."""
        given = self.model_dump(include=set(ServerConfig.model_fields), exclude_unset=True)
        return EngineArgs.model_validate(dict(given, port=port, num_threads=num_threads, log_format="json"))


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(f"extra_args: {message}")


COMMAND_PLACEHOLDERS = ("port", "gpu")  # what a command template may name, filled in per engine
HEALTH_PATH = "/health"  # our engine's readiness path; SGLang's and vLLM's too


class CommandGroupConfig(Placement):
    """`count` copies of a server the user already runs (SGLang, vLLM, ...), or one per listed GPU: its
    command line is a template whose {port} and {gpu} the supervisor fills in for each engine (Python's
    str.format rules: {{ and }} are literal braces). Engines are reached on 127.0.0.1:{port}."""

    model_config = ConfigDict(**Strict.model_config, coerce_numbers_to_str=True)  # [--tp, 2]: "2" in the argv
    command: list[str]  # argv, run without a shell; a string is split as a shell would
    health_path: str = HEALTH_PATH  # answers 200 once the server is ready (the supervisor waits for it)

    @model_validator(mode="before")
    @classmethod
    def _no_engine_settings(cls, raw):
        """Our engine's settings would be ignored by another server: refuse them by name."""
        if isinstance(raw, dict):
            if "model" in raw:
                raise ValueError("model: a group runs either our engine (model) or a command, not both")
            for name in raw:
                if name in EngineGroupConfig.model_fields and name not in cls.model_fields:
                    raise ValueError(f"{name}: a setting of our engine (groups with model); a command group "
                                     f"gives its server's own flags in command")
        return raw

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, command):
        if isinstance(command, str):
            try:
                command = shlex.split(command)
            except ValueError as exc:
                raise ValueError(f"cannot split it as a shell would: {exc}") from None
        if isinstance(command, list):
            for arg in command:
                if isinstance(arg, dict) and len(arg) == 1 and next(iter(arg)) in COMMAND_PLACEHOLDERS:
                    name = next(iter(arg))
                    raise ValueError(f"quote '{{{name}}}': YAML reads an unquoted {{{name}}} as a mapping")
        return command

    @field_validator("command")
    @classmethod
    def _template(cls, command: list[str]) -> list[str]:
        if not command or not command[0]:
            raise ValueError("empty: give the server's command line, e.g. [vllm, serve, MODEL, --port, '{port}']")
        if "port" not in set().union(*map(placeholders, command)):
            raise ValueError("no {port} placeholder: each engine must listen on the port the supervisor gives it")
        if shutil.which(command[0]) is None:
            raise ValueError(f"{command[0]!r} is not an executable on this host's PATH")
        return command

    @field_validator("health_path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with /")
        return path

    @model_validator(mode="after")
    def _placement(self):
        self._check_gpus()
        if self.gpus is None and any("gpu" in placeholders(arg) for arg in self.command):
            raise ValueError("command: {gpu} names the engine's GPU, but this group pins none (give gpus)")
        return self

    @property
    def served_model(self) -> str | None:
        return None  # the server's own flags name it; the gateway reads it from /v1/models

    def argv(self, port: int, gpu: str | None) -> list[str]:
        """One engine's command line: the template with its port and GPU filled in."""
        return [arg.format(port=port, gpu=gpu) for arg in self.command]


def placeholders(arg: str) -> set[str]:
    """The placeholders one command argument names; ValueError for any that `argv` could not fill."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(arg)
                  if name is not None]
    except ValueError as exc:  # "Single '}' encountered in format string", "expected '}' before end of string"
        raise ValueError(f"{arg!r}: unbalanced braces ({exc}); write {{{{ and }}}} for literal ones") from None
    for name, spec, conversion in fields:
        if name not in COMMAND_PLACEHOLDERS or spec or conversion:
            text = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            known = ", ".join(f"{{{p}}}" for p in COMMAND_PLACEHOLDERS)
            raise ValueError(f"{arg!r}: unknown placeholder {{{text}}}; the placeholders are {known} (write {{{{ "
                             f"and }}}} for literal braces)")
    return {name for name, _, _ in fields}


def _group_kind(raw) -> str:
    is_command = isinstance(raw, CommandGroupConfig) or (isinstance(raw, dict) and "command" in raw)
    return "command group" if is_command else "model group"


# A group with `command` is a command group, any other our engine's. The tags are no identifiers, so
# error paths leave them out ("engines.0.count", as for a plain list).
EngineGroup = Annotated[Annotated[EngineGroupConfig, Tag("model group")]
                        | Annotated[CommandGroupConfig, Tag("command group")], Discriminator(_group_kind)]


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
    engines: list[EngineGroup] = []
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


def group_size(group: Placement) -> int:
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
