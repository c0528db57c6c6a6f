"""The gateway's configuration: YAML validated by pydantic; an invalid file names the field and why."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .policies import POLICIES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerConfig(_Strict):
    url: str
    name: str | None = None  # default: the URL

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class PolicyConfig(_Strict):
    name: str = "prefix_affinity"
    block_size: int = Field(64, ge=1)
    max_bytes_per_worker: int = Field(64 << 20, ge=1)
    min_match_ratio: float = Field(0.3, ge=0, le=1)
    load_margin: int = Field(4, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown routing policy; choose one of {sorted(POLICIES)}")
        return name

    def options(self) -> dict:
        if self.name != "prefix_affinity":
            return {}
        return self.model_dump(exclude={"name"})


class HealthConfig(_Strict):
    interval: float = Field(5.0, gt=0)  # seconds between /health probes of each worker
    timeout: float = Field(2.0, gt=0)
    failure_threshold: int = Field(2, ge=1)  # consecutive failures ⇒ unhealthy
    success_threshold: int = Field(1, ge=1)  # consecutive successes ⇒ ready again
    stall_timeout: float = Field(60.0, gt=0)  # in-flight requests but no byte for this long ⇒ unhealthy
    breaker_threshold: int = Field(5, ge=1)  # connect errors / 5xx in a row that open a worker's circuit
    breaker_cooldown: float = Field(30.0, gt=0)  # seconds an open circuit keeps the worker out


class ApiKeyConfig(_Strict):
    name: str
    hash: str  # "sha256:<hex>", as printed by `sglang-gw key create`; the key itself is never stored
    rpm: int | None = Field(None, ge=1)  # requests per minute
    max_concurrent: int | None = Field(None, ge=1)
    models: list[str] | None = None  # None: every model

    @field_validator("hash")
    @classmethod
    def _sha256(cls, value: str) -> str:
        digest = value.removeprefix("sha256:")
        if not value.startswith("sha256:") or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("must be 'sha256:' and 64 lowercase hex digits (see `sglang-gw key create`)")
        return value


class AuthConfig(_Strict):
    keys: list[ApiKeyConfig] = []
    keys_file: str | None = None  # a YAML list of keys in the same shape, added to `keys`
    open_health: bool = True  # /health and /ready without a key
    open_metrics: bool = True  # /metrics without a key


class AdminConfig(_Strict):
    key_hash: str | None = None  # "sha256:<hex>" of the admin key; None disables the admin API

    @field_validator("key_hash")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        return None if value is None else ApiKeyConfig._sha256(value)


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: list[WorkerConfig] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    auth: AuthConfig = AuthConfig()
    admin: AdminConfig = AdminConfig()
    health: HealthConfig = HealthConfig()
    request_timeout: float = Field(600.0, gt=0)
    max_retries: int = Field(2, ge=0)  # other workers tried before the first response byte
    retry_backoff: float = Field(0.05, ge=0)  # seconds, doubled per retry, with jitter
    max_request_bytes: int = Field(16 << 20, ge=1)
    # Per-worker concurrency cap (None: no cap). With every candidate at the cap, requests wait in a
    # bounded queue; past max_queued_requests, or after queue_timeout seconds, they get 503 + Retry-After.
    max_inflight_per_worker: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(256, ge=0)
    queue_timeout: float = Field(30.0, gt=0)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path) -> GatewayConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    config = parse_config(raw or {}, str(path))
    keys_file = config.auth.keys_file
    if keys_file is None:
        return config
    keys_path = Path(path).parent / keys_file
    try:
        extra = yaml.safe_load(keys_path.read_text()) or []
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: auth.keys_file: {exc}") from None
    raw = dict(raw, auth=dict(raw.get("auth", {}), keys=list(raw["auth"].get("keys", [])) + list(extra)))
    return parse_config(raw, f"{path} + {keys_path}")


def parse_config(raw: dict, source: str = "config") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {field}: {err['msg'].removeprefix('Value error, ')}") from None
