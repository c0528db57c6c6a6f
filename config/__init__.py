"""The `sglang-gw serve` configuration: schema, loading with `--set` overrides, and example files."""

from ..gateway.config import ConfigError
from .schema import (EngineGroupConfig, LoggingConfig, ServeConfig, SupervisorConfig, load_serve_config,
                     local_engine_names, parse_serve_config)

__all__ = ["ConfigError", "EngineGroupConfig", "LoggingConfig", "ServeConfig", "SupervisorConfig",
           "load_serve_config", "local_engine_names", "parse_serve_config"]
