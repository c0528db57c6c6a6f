"""The `sglang-gw serve` configuration: schema, loading with `--set` overrides, and example files."""

from ..validation import ConfigError
from .schema import (CommandGroupConfig, EngineGroupConfig, LoggingConfig, ServeConfig, SupervisorConfig,
                     load_serve_config, local_engine_names, parse_serve_config, visible_gpus)

__all__ = ["CommandGroupConfig", "ConfigError", "EngineGroupConfig", "LoggingConfig", "ServeConfig",
           "SupervisorConfig", "load_serve_config", "local_engine_names", "parse_serve_config", "visible_gpus"]
