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


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: list[WorkerConfig] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    health: HealthConfig = HealthConfig()
    request_timeout: float = Field(600.0, gt=0)
    max_retries: int = Field(2, ge=0)  # other workers tried before the first response byte
    retry_backoff: float = Field(0.05, ge=0)  # seconds, doubled per retry, with jitter
    max_request_bytes: int = Field(16 << 20, ge=1)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path) -> GatewayConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(raw or {}, str(path))


def parse_config(raw: dict, source: str = "config") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {field}: {err['msg'].removeprefix('Value error, ')}") from None
