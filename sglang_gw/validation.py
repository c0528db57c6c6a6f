"""Validation shared by every config and request schema: strict models, and errors that name the field.

pydantic reports the first problem as a location and a message; `describe` turns that into the
`field.path` users wrote and the reason, for config files ("config.yaml: engines.0.gpus: ...") and
for request bodies (an OpenAI error's `param`) alike.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

# pydantic tags union members in an error's location ("text.str", "input_ids.list[int].1").
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class Strict(BaseModel):
    """Unknown keys are errors, and a validated value never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    pass


def describe(exc: ValidationError) -> tuple[str | None, str]:
    """(the field path of the first error, or None for a cross-field check; the reason)."""
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]
                    if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)) or None
    return path, err["msg"].removeprefix("Value error, ")


def validate(model: type[BaseModel], raw: dict, source: str):
    """`model` from `raw`, or ConfigError("source: field.path: reason") naming the first bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        field, why = describe(exc)
        # Cross-field checks (model validators) have no location: their message starts with the field.
        raise ConfigError(f"{source}: {field}: {why}" if field else f"{source}: {why}") from None


def read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw or {}
