"""The gateway's configuration: YAML validated by pydantic; an invalid file names the field and why."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import (Field, ValidationInfo, field_validator,
                      model_serializer, model_validator)

from ..validation import ConfigError, Strict, read_yaml, validate
from .policies import POLICIES, RoutingPolicy


class WorkerConfig(Strict):
    url: str
    name: str | None = None  # default: the URL
    health_path: str = Field("/health", pattern="^/")  # what the probes ask (200 = serving)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class PolicyConfig(Strict):
    name: str = "prefix_affinity"
    # The options of the policies that take them (each policy's keyword-only arguments); one set for
    # a policy that does not take it is refused rather than silently ignored.
    block_size: int = Field(64, ge=1)
    max_bytes_per_worker: int = Field(64 << 20, ge=1)
    min_match_ratio: float = Field(0.3, ge=0, le=1)
    load_margin: int = Field(RoutingPolicy.load_margin, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown routing policy; choose one of {sorted(POLICIES)}")
        return name

    @field_validator("*")
    @classmethod
    def _taken_by_the_policy(cls, value, info: ValidationInfo):
        policy = POLICIES.get(info.data.get("name"))  # fields validate in order: `name` is first
        if info.field_name != "name" and policy is not None and info.field_name not in policy.option_names():
            users = sorted(name for name, p in POLICIES.items() if info.field_name in p.option_names())
            raise ValueError(f"only used by {', '.join(users)}")
        return value

    @model_serializer(mode="wrap")
    def _without_unused_options(self, dump) -> dict:
        # The effective config (`check-config`) must load again: leave out what the policy refuses.
        return {k: v for k, v in dump(self).items() if k == "name" or k in self._option_names()}

    def _option_names(self) -> frozenset[str]:
        return POLICIES[self.name].option_names()

    def options(self) -> dict:
        """The policy's keyword arguments (create_policy, retune)."""
        return self.model_dump(include=set(self._option_names()))


class HealthConfig(Strict):
    interval: float = Field(5.0, gt=0)  # seconds between /health probes of each worker
    timeout: float = Field(2.0, gt=0)
    # What each setting does to a worker: see health.py.
    failure_threshold: int = Field(2, ge=1)  # consecutive failed probes ⇒ unhealthy
    success_threshold: int = Field(1, ge=1)  # consecutive successful probes ⇒ ready again
    stall_timeout: float = Field(60.0, gt=0)  # in-flight requests but no byte for this long ⇒ unhealthy
    hang_timeout: float = Field(60.0, gt=0)  # the engine reports work but no finished step for this long ⇒ hung
    breaker_threshold: int = Field(5, ge=1)  # connect errors / 5xx / broken answers in a row that open the circuit
    breaker_cooldown: float = Field(30.0, gt=0)  # seconds an open circuit keeps the worker out before one trial


class ApiKeyConfig(Strict):
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


class AuthConfig(Strict):
    keys: list[ApiKeyConfig] = []
    keys_file: str | None = None  # a YAML list of keys in the same shape, added to `keys`
    open_health: bool = True  # /health and /ready without a key
    open_metrics: bool = True  # /metrics without a key


class AdminConfig(Strict):
    key_hash: str | None = None  # "sha256:<hex>" of the admin key; None disables the admin API

    @field_validator("key_hash")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        return None if value is None else ApiKeyConfig._sha256(value)


class DiscoveryConfig(Strict):
    """Workers found in DNS: every address of `dns` (e.g. a Kubernetes headless Service) is a worker."""

    dns: str  # a host name whose A/AAAA records are the engines
    port: int = Field(30000, ge=1, le=65535)
    interval: float = Field(10.0, gt=0)  # seconds between lookups
    scheme: str = Field("http", pattern="^https?$")
    family: str = Field("any", pattern="^(any|ipv4|ipv6)$")


class SessionConfig(Strict):
    """Session affinity (gateway/sessions.py): a request's session key keeps it on its session's worker."""

    enabled: bool = True
    # Headers whose value is the session key, the first present wins: ours and SGLang's router's
    # (x-smg-routing-key), then what coding agents send: Claude Code, Codex (session-id; older
    # versions session_id), OpenCode (x-session-affinity). Matched without regard to case.
    headers: tuple[str, ...] = ("x-session-id", "x-smg-routing-key", "x-claude-code-session-id", "session-id",
                                "session_id", "x-session-affinity")
    use_user_field: bool = True  # without such a header, the OpenAI `user` field is the key
    idle_timeout: float = Field(1800.0, gt=0)  # seconds without a request before a session is forgotten
    max_sessions: int = Field(100_000, ge=1)  # beyond this, the least recently used session is forgotten
    # Requests a session's worker may be busier than the least-loaded candidate before the session
    # moves; None: the policy's (prefix_affinity's policy.load_margin, RoutingPolicy.load_margin for the others).
    load_margin: int | None = Field(None, ge=0)

    @field_validator("headers")
    @classmethod
    def _names(cls, headers: tuple[str, ...]) -> tuple[str, ...]:
        if any(not h.strip() or any(c.isspace() or c == ":" for c in h) for h in headers):
            raise ValueError("header names must be non-empty, without spaces or ':'")
        return tuple(h.lower() for h in headers)


class CachePredictionConfig(Strict):
    """The check of routing's predicted cached tokens against the engines' reports (gateway/cache_prediction.py)."""

    window: int = Field(64, ge=0)  # predicted hits per worker judged together; 0: never distrust
    min_ratio: float = Field(0.5, ge=0, le=1)  # reported / predicted below this over a window distrusts the worker
    cooldown: float = Field(60.0, gt=0)  # seconds a distrusted worker's prefix matches draw no requests


class StatusConfig(Strict):
    """The live status page (gateway/status.py): GET /status, and the JSON it polls, GET /status.json."""

    open: bool = False  # /status.json without the admin key (the page itself holds no data and is always served)
    # Seconds between the page's polls; the engines' /metrics are read at most once per half of it,
    # however many pages are open, and not at all while none is.
    refresh: float = Field(2.0, ge=0.2, le=60)


class GatewaySettings(Strict):
    """Everything about the gateway but its worker list (in `serve`, the supervisor supplies that)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    discovery: DiscoveryConfig | None = None
    policy: PolicyConfig = PolicyConfig()
    session: SessionConfig = SessionConfig()
    cache_prediction: CachePredictionConfig = CachePredictionConfig()
    auth: AuthConfig = AuthConfig()
    admin: AdminConfig = AdminConfig()
    status: StatusConfig = StatusConfig()
    health: HealthConfig = HealthConfig()
    request_timeout: float = Field(600.0, gt=0)
    max_retries: int = Field(2, ge=0)  # other workers tried before the first response byte
    # Once generation has begun and its worker fails, other workers that continue it from the tokens the
    # client has (streams, and non-streamed answers past their first checkpoint); 0: off (gateway/failover.py).
    max_failovers: int = Field(2, ge=0)
    retry_backoff: float = Field(0.05, ge=0)  # seconds, doubled per retry, with jitter
    max_request_bytes: int = Field(16 << 20, ge=1)
    # Per-worker concurrency cap (None: no cap). With every candidate at the cap, requests wait in a
    # bounded queue; past max_queued_requests, or after queue_timeout seconds, they get 503 + Retry-After.
    max_inflight_per_worker: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(256, ge=0)
    queue_timeout: float = Field(30.0, gt=0)
    # Processes serving the port. 1: this one. More: that many relay processes share the port (SO_REUSEPORT)
    # and run the request path, asking this process, which keeps all routing state, for each attempt's
    # worker (gateway/relay.py): for traffic past one core's worth of requests.
    processes: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _fixed_port_for_relays(self):
        if self.processes > 1 and self.port == 0:
            raise ValueError("processes: relay processes share one port: give a fixed port, not 0")
        return self


class GatewayConfig(GatewaySettings):
    workers: list[WorkerConfig] = []

    @model_validator(mode="after")
    def _some_workers(self):
        if not self.workers and self.discovery is None:
            raise ValueError("workers: list at least one worker (or configure discovery)")
        if len({w.name or w.url for w in self.workers}) != len(self.workers):
            raise ValueError("workers: names must be unique")
        return self


def merge_keys_file(path: str | Path, auth: dict | None, field: str = "auth") -> dict | None:
    """`auth` with the keys of its `keys_file` (a YAML list, relative to the config file) appended."""
    if not isinstance(auth, dict) or auth.get("keys_file") is None:
        return auth
    keys_path = Path(path).parent / str(auth["keys_file"])
    try:
        extra = yaml.safe_load(keys_path.read_text()) or []
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {field}.keys_file: {exc}") from None
    if not isinstance(extra, list):
        raise ConfigError(f"{path}: {field}.keys_file: {keys_path} must hold a YAML list of keys")
    return dict(auth, keys=list(auth.get("keys") or []) + extra)


def load_config(path: str | Path) -> GatewayConfig:
    raw = read_yaml(path)
    raw["auth"] = merge_keys_file(path, raw.get("auth"))
    return validate(GatewayConfig, {k: v for k, v in raw.items() if v is not None}, str(path))


def parse_config(raw: dict, source: str = "config") -> GatewayConfig:
    return validate(GatewayConfig, raw, source)
