"""Every engine setting, declared once: name, type, default, range, help, and the devices it applies to.

This module imports no torch, so the gateway, the supervisor and the config checker can use it.
Everything else is derived from the classes below:

    SchedulerConfig   what the scheduler reads
    EngineConfig      + model, device, memory and backend: what `Engine(...)` takes (offline API)
    ServerConfig      + the HTTP server's own settings: a serve config's engine group is this plus placement
    EngineArgs        + what the supervisor sets per process: the `sglang-gw engine` command line

`add_flags` turns a class into argparse flags, `from_flags` reads them back validated, and `to_flags` gives the argv that reproduces an instance exactly (the supervisor passes
each engine its settings that way). Only explicitly given values count as "set": a setting that does
not apply to the engine's device (e.g. `mem_fraction_static` on a CPU engine) is refused when set,
since it would be ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import types
import typing
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..validation import Strict, validate

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
ATTENTION_BACKENDS = ("torch", "cpu", "triton")  # the names engine/attention.py registers
GRAMMAR_BACKENDS = ("llguidance", "none")  # the names engine/grammar.py registers
ALL_DEVICES = ("cpu", "cuda")


def setting(default, help: str, *, devices: tuple[str, ...] = ALL_DEVICES, **bounds):
    """A setting's declaration: default, help text, the device types it applies to, pydantic bounds."""
    return Field(default, description=help, json_schema_extra={"devices": list(devices)}, **bounds)


def devices_of(field) -> tuple[str, ...]:
    """The device types a declared field applies to (every type for fields `setting` did not declare)."""
    return tuple((field.json_schema_extra or {}).get("devices", ALL_DEVICES))


class Settings(Strict):
    def replace(self, **changes):
        """A validated copy with `changes`; fields given explicitly before stay explicit."""
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **changes})


class SchedulerConfig(Settings):
    """scheduler: batching, chunked prefill, queue order"""

    max_running_requests: int = setting(64, "requests decoding together in one batch", ge=1)
    chunked_prefill_size: int = setting(2048, "prompt tokens one request may prefill per step (longer prompts "
                                              "are split into chunks)", ge=1)
    max_prefill_tokens: int | None = setting(None, "prompt tokens one prefill step may run over all its requests "
                                                   "(default: chunked_prefill_size)", ge=1)
    schedule_policy: Literal["fcfs", "lpm"] = setting("fcfs", "waiting-queue order: fcfs (arrival) or lpm "
                                                              "(longest cached prefix first)")
    disable_jump_forward: bool = setting(False, "sample every token of a constrained output, even where its "
                                               "grammar allows only one continuation (by default such runs "
                                               "are emitted without a forward pass each)")
    batch_log_interval: float = setting(5.0, "seconds between SGLang-style 'Prefill batch.' / 'Decode batch.' "
                                             "log lines", gt=0)

    @property
    def prefill_step_tokens(self) -> int:
        return self.max_prefill_tokens or self.chunked_prefill_size

    @model_validator(mode="after")
    def _chunk_fits_a_step(self):
        if self.chunked_prefill_size > self.prefill_step_tokens:
            raise ValueError(f"chunked_prefill_size: {self.chunked_prefill_size} exceeds max_prefill_tokens "
                             f"({self.max_prefill_tokens}): a chunk must fit in one prefill step")
        return self


class EngineConfig(SchedulerConfig):
    """engine: model, device, memory, attention"""

    model: str = setting(DEFAULT_MODEL, "an embedded model id (builtin:...) or an HF model directory")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "weights and KV dtype; auto = bfloat16 on CUDA and on CPUs with bf16 dot products (AVX512-BF16, "
                "AMX), float32 on other CPUs (where bf16 is emulated and several times slower)")
    max_total_tokens: int | None = setting(None, "KV pool size in tokens (default: from kv_cache_gib on CPU, "
                                                 "mem_fraction_static on CUDA)", ge=1)
    kv_cache_gib: float = setting(1.0, "KV pool budget in GiB", devices=("cpu",), gt=0)
    mem_fraction_static: float = setting(0.85, "fraction of the GPU's memory for weights + KV pool",
                                         devices=("cuda",), gt=0, lt=1)
    context_length: int | None = setting(None, "longest prompt + output in tokens (default and maximum: the "
                                               "model's max_position_embeddings)", ge=2)
    sampling_defaults: Literal["model", "openai"] = setting(
        "model", "what a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset gets: "
                 "model = the model's generation_config.json values (where it has them), openai = temperature 1, "
                 "no top-p/top-k/min-p, no repetition penalty")
    disable_radix_cache: bool = setting(False, "do not keep finished requests' KV for prefix reuse")
    grammar_backend: Literal[GRAMMAR_BACKENDS] = setting(
        "llguidance", "constrained output (regex, json_schema, ebnf, response_format, forced tool calls): "
                      "llguidance, or none to refuse such requests")
    attention_backend: Literal[("auto", *ATTENTION_BACKENDS)] = setting(
        "auto", "torch: the reference (SDPA); cpu: the reference plus a C++ decode kernel that reads the KV "
                "pool in place, so requests sharing a prefix share its reads (compiled on first use; CPU devices "
                "only); triton: Triton kernels that read the KV pool in place for prefill and decode (CUDA; on "
                "CPU only under Triton's interpreter, TRITON_INTERPRET=1, for tests); auto = cpu on CPU (torch "
                "where the kernel cannot be built), triton on CUDA (torch where triton is not installed)")
    cuda_graph_max_bs: int = setting(256, "largest decode batch replayed from a CUDA graph: graphs are captured at "
                                          "start-up for batch sizes 1, 2, 4, 8 and multiples of 16 up to this and "
                                          "max_running_requests; a batch is padded to the next captured size, and "
                                          "a larger one runs eagerly; 0 = no graphs (triton backend only)",
                                     devices=("cuda",), ge=0)
    num_threads: int | None = setting(None, "torch threads for this process (default: torch's choice; split "
                                            "the cores between engines)", ge=1)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ValueError("must be cpu, cuda or cuda:N")
        return device

    @model_validator(mode="after")
    def _nothing_ignored(self):
        """A setting given explicitly must take effect: refuse the ones this engine would ignore."""
        for name in sorted(self.model_fields_set):
            devices = devices_of(type(self).model_fields[name])
            if getattr(self, name) is None:
                continue
            if self.device_type not in devices:
                raise ValueError(f"{name}: applies to {' and '.join(devices)} engines only, and this engine's "
                                 f"device is {self.device}")
            if name == "attention_backend" and self.attention_backend == "cpu" and self.device_type != "cpu":
                raise ValueError(f"attention_backend: cpu runs on CPU devices only, and this engine's device is "
                                 f"{self.device}")
            if (name == "attention_backend" and self.attention_backend == "triton" and self.device_type == "cpu"
                    and not triton_interpreted()):
                raise ValueError("attention_backend: triton runs on CUDA devices (on CPU only under Triton's "
                                 "interpreter, TRITON_INTERPRET=1), and this engine's device is cpu")
            if (name == "cuda_graph_max_bs" and self.cuda_graph_max_bs
                    and self.attention_backend not in ("auto", "triton")):
                raise ValueError(f"cuda_graph_max_bs: CUDA graphs run with attention_backend triton (or auto), not "
                                 f"{self.attention_backend}; set 0 for none")
            if name in ("kv_cache_gib", "mem_fraction_static") and self.max_total_tokens is not None:
                raise ValueError(f"{name}: not used when max_total_tokens sizes the KV pool; give one of them")
        return self


def triton_interpreted() -> bool:
    """Whether Triton will interpret kernels on the CPU (it reads TRITON_INTERPRET as true for these values)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


class ServerConfig(EngineConfig):
    """HTTP server"""

    host: str = setting("127.0.0.1", "listen address")
    served_model_name: str | None = setting(None, "the model id clients send (default: the model value)")
    max_queued_requests: int = setting(1024, "requests beyond max_running_requests that may wait; more get 503",
                                       ge=0)
    max_request_bytes: int = setting(16 << 20, "larger request bodies get 413", ge=1)
    graceful_shutdown_timeout: float = setting(30.0, "seconds in-flight requests get to finish after SIGTERM",
                                               ge=0)


class EngineArgs(ServerConfig):
    """this process (set by the supervisor for each engine it runs)"""

    port: int = setting(30000, "listen port", ge=1, le=65535)
    api_key: str | None = setting(None, "require this key (also $SGLANG_GW_API_KEY); /health, /health_generate "
                                        "and /metrics stay open")
    log_format: Literal["auto", "json", "console"] = setting("auto", "auto: console on a terminal, JSON otherwise")


# Set by the supervisor for every engine it runs: not part of a serve config's engine group.
PER_PROCESS = tuple(name for name in EngineArgs.model_fields if name not in ServerConfig.model_fields)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, model: type[Settings]) -> None:
    """One flag per field of `model`, grouped by the class that declares it. Flags left out stay absent
    from the namespace (SUPPRESS), so that `given_flags` knows which settings were given."""
    declared: set[str] = set()
    for cls in reversed([c for c in model.__mro__ if isinstance(c, type) and issubclass(c, Settings)]):
        group = parser.add_argument_group(cls.__doc__) if cls.__doc__ else parser
        for name, field in cls.model_fields.items():
            if name in declared:
                continue
            declared.add(name)
            group.add_argument(flag(name), default=argparse.SUPPRESS, help=_help(field),
                               **_flag_kind(field.annotation))


def given_flags(namespace: argparse.Namespace, model: type[Settings]) -> dict:
    """The fields of `model` given on the command line (validate them with `model`)."""
    return {name: getattr(namespace, name) for name in model.model_fields if hasattr(namespace, name)}


def from_flags(namespace: argparse.Namespace, model: type[Settings], source: str):
    """The settings given on the command line, validated (ConfigError "source: field: why")."""
    return validate(model, given_flags(namespace, model), source)


def to_flags(settings: Settings) -> list[str]:
    """The argv that `add_flags` + `given_flags` turn back into `settings` (explicit fields only)."""
    argv = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name not in settings.model_fields_set or value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            argv += [flag(name), str(value)]
    return argv


def _help(field) -> str:
    devices = devices_of(field)
    only = f" [{' and '.join(devices)} only]" if devices != ALL_DEVICES else ""
    default = f" (default: {field.default})" if field.default is not None else ""
    return f"{field.description}{only}{default}".replace("%", "%%")  # argparse %-formats help


def _flag_kind(annotation) -> dict:
    """argparse keywords for a field's type: Optional unwrapped, Literal as choices, bool as --x/--no-x."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _flag_kind(args[0])
    if typing.get_origin(annotation) is Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}
