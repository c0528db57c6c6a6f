"""SGLang's sampling parameters, their defaults and validation rules (see docs/sglang-api.md)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from ..limits import (MAX_ABS_LOGIT_BIAS, MAX_COUNT, MAX_LOGIT_BIAS, MAX_N, MAX_STOP, MAX_STOP_TOKEN_IDS,
                      SEED_MAX, SEED_MIN)

class InvalidParamError(ValueError):
    """A request parameter is out of range; `param` names the field and `code` is the OpenAI-style
    error code, both set where the error is raised (the HTTP layer copies them into its 400)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.code = code


GRAMMAR_KINDS = ("regex", "json_schema", "ebnf")  # SGLang's sampling_params fields, one per kind of grammar


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: `kind` is one of GRAMMAR_KINDS, `source` its text."""

    kind: str
    source: str


class _UnsetFloat(float):
    """A float field's fallback value, marked as not chosen by the caller: `with_defaults` may replace it.
    Being the number itself, it works as the value wherever it is read before that."""


class _UnsetInt(int):
    """An int field's fallback value, marked like _UnsetFloat."""


def _is_unset(value) -> bool:
    return isinstance(value, (_UnsetFloat, _UnsetInt))


@dataclass(frozen=True)
class SamplingParams:
    """A field the caller does not give (constructor keyword, JSON key) keeps its marked fallback, so it
    stays unset through `dataclasses.replace` of other fields; explicit values are plain numbers."""

    max_new_tokens: int = 128
    temperature: float = _UnsetFloat(1.0)
    top_p: float = _UnsetFloat(1.0)
    top_k: int = _UnsetInt(-1)
    min_p: float = _UnsetFloat(0.0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = _UnsetFloat(1.0)
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    sampling_seed: int | None = None
    # Constrained output: at most one grammar (see engine/grammar.py); stop_regex ends the output at the
    # first match of any of its patterns, keeping the matched text (as SGLang does).
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    stop_regex: tuple[str, ...] = ()

    @staticmethod
    def from_dict(d: dict | None) -> "SamplingParams":
        """From SGLang's JSON `sampling_params`; unknown keys and wrong types are errors naming the key."""
        d = dict(d or {})
        known = {f.name: f for f in fields(SamplingParams)}
        kwargs = {}
        for key, value in d.items():
            if key not in known:
                raise InvalidParamError(key, "unknown sampling parameter")
            if value is None:
                continue
            kwargs[key] = _coerce(key, value)
        params = SamplingParams(**kwargs)
        params.validate()
        return params

    def with_defaults(self, model_defaults: Mapping[str, float | int]) -> "SamplingParams":
        """Every field the caller left unset resolved, to the model's default where `model_defaults` has one
        (see `read_sampling_defaults`), else to its fallback; explicit values stay as they are."""
        resolved = {}
        for name in SAMPLING_DEFAULT_KEYS:
            value = getattr(self, name)
            if _is_unset(value):
                fallback = float(value) if isinstance(value, float) else int(value)
                resolved[name] = model_defaults.get(name, fallback)
        return replace(self, **resolved)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6

    @property
    def grammar(self) -> GrammarSpec | None:
        for kind in GRAMMAR_KINDS:
            if getattr(self, kind) is not None:
                return GrammarSpec(kind, getattr(self, kind))
        return None

    @property
    def needs_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        checks = [
            ("max_new_tokens", 0 <= self.max_new_tokens <= MAX_COUNT, f"must be in [0, {MAX_COUNT}]"),
            ("temperature", 0 <= self.temperature < math.inf, "must be >= 0 and finite"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or 1 <= self.top_k <= MAX_COUNT, f"must be -1 (all) or in [1, {MAX_COUNT}]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 2, "must be in (0, 2]"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens, "must be in [0, max_new_tokens]"),
            ("n", 1 <= self.n <= MAX_N, f"must be in [1, {MAX_N}]"),
            ("sampling_seed", self.sampling_seed is None or SEED_MIN <= self.sampling_seed <= SEED_MAX,
             "must be a 64-bit integer"),
            ("stop", len(self.stop) <= MAX_STOP, f"at most {MAX_STOP} strings"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_regex", len(self.stop_regex) <= MAX_STOP, f"at most {MAX_STOP} patterns"),
            ("stop_regex", all(isinstance(s, str) and s for s in self.stop_regex), "must be non-empty strings"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} ids"),
            ("logit_bias", len(self.logit_bias) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} entries"),
            ("logit_bias", all(abs(b) <= MAX_ABS_LOGIT_BIAS for b in self.logit_bias.values()),
             f"each bias must be in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidParamError(name, why)
        given = [kind for kind in GRAMMAR_KINDS if getattr(self, kind) is not None]
        if len(given) > 1:
            raise InvalidParamError(given[1], f"give at most one of {', '.join(GRAMMAR_KINDS)} (got {', '.join(given)})")
        for pattern in self.stop_regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidParamError("stop_regex", f"invalid regex {pattern!r}: {exc}") from None


# The fields a model's generation_config.json may give defaults for (SGLang's `--sampling-defaults model`).
SAMPLING_DEFAULT_KEYS = tuple(f.name for f in fields(SamplingParams) if _is_unset(f.default))


def _coerce(key: str, value):
    """JSON value → the field's type, refusing lossy or nonsensical conversions."""
    if key in ("stop", "stop_regex"):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        raise InvalidParamError(key, "must be a string or a list of strings")
    if key in ("regex", "ebnf"):
        if isinstance(value, str):
            return value
        raise InvalidParamError(key, "must be a string")
    if key == "json_schema":  # SGLang takes the schema as a JSON string; an object is taken as well
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, bool)):
            return json.dumps(value)
        raise InvalidParamError(key, "must be a JSON schema (a string or an object)")
    if key == "stop_token_ids":
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return tuple(value)
        raise InvalidParamError(key, "must be a list of integers")
    if key == "logit_bias":
        if not isinstance(value, dict):
            raise InvalidParamError(key, "must be an object of token id → bias")
        try:
            return {int(k): _finite(key, v) for k, v in value.items()}
        except (TypeError, ValueError):  # a key that is no integer, a value that is no number
            raise InvalidParamError(key, "must map integer token ids to finite numbers") from None
    if key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        if isinstance(value, bool):
            return value
        raise InvalidParamError(key, "must be a boolean")
    if key in ("max_new_tokens", "top_k", "min_new_tokens", "n", "sampling_seed"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidParamError(key, "must be an integer")
    return _finite(key, value)


def _finite(key: str, value) -> float:
    """A JSON number as a finite float (NaN, infinities and integers beyond float range are refused)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise InvalidParamError(key, "must be a finite number")
