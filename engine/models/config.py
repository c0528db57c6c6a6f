"""The model facts our forward pass needs, read from an HF config.json (transformers 4.x or 5.x), and the
sampling defaults of its generation_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..sampling_params import SAMPLING_DEFAULT_KEYS, InvalidParamError, SamplingParams

# architectures → family; the families differ only in the flags below.
_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    eos_token_ids: tuple[int, ...]

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        return ModelConfig.from_dict(raw, gen)

    @staticmethod
    def from_dict(raw: dict, generation_config: dict | None = None) -> "ModelConfig":
        arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in _FAMILIES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(_FAMILIES)}")
        family = _FAMILIES[arch]
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        eos = (generation_config or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return ModelConfig(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position=raw.get("max_position_embeddings", 4096),
            rope=_rope_config(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            eos_token_ids=eos_ids,
        )


def read_sampling_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """The sampling defaults a model's generation_config.json gives (only the keys it sets), read as HF
    generate reads them: `do_sample: false` means greedy whatever the temperature, and top_k 0 means no
    top-k. A value no request could give is a ValueError naming the file."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    generation_config = json.loads(path.read_text())
    given = {key: generation_config[key] for key in SAMPLING_DEFAULT_KEYS if generation_config.get(key) is not None}
    if generation_config.get("do_sample") is False:
        given["temperature"] = 0.0
    if given.get("top_k") == 0:
        given["top_k"] = -1
    try:
        params = SamplingParams.from_dict(given)
    except InvalidParamError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return {key: getattr(params, key) for key in given}


def _rope_config(raw: dict) -> RopeConfig:
    # transformers 5 nests everything under rope_parameters; 4.x has rope_theta + rope_scaling.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "llama3", "linear"):
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, llama3, linear")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )
