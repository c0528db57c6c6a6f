"""Our forward pass for the Llama family (Llama, Mistral-style, Qwen2 with QKV bias, Qwen3 with q/k norms).

Weights are loaded from HF safetensors and fused at load time: q/k/v into one projection and
gate/up into another, so each layer runs four matmuls (each a `Linear`: prepacked for oneDNN on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..attention import AttentionBackend
from ..batch import ForwardBatch
from .config import ModelConfig, RopeConfig
from .linear import Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF: normalise in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D] (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.config = config
        self.dtype = dtype
        self.device = device
        c = config

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = Linear(self.embed if c.tie_word_embeddings or "lm_head.weight" not in weights
                              else w("lm_head.weight"))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                LayerWeights(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv=Linear(torch.cat([w(a + "q_proj.weight"), w(a + "k_proj.weight"), w(a + "v_proj.weight")]),
                               torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")])
                               if c.qkv_bias else None),
                    q_norm=w(a + "q_norm.weight") if c.qk_norm else None,
                    k_norm=w(a + "k_norm.weight") if c.qk_norm else None,
                    o_proj=Linear(w(a + "o_proj.weight")),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=Linear(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])),
                    down=Linear(w(p + "mlp.down_proj.weight")),
                )
            )
        inv_freq = rope_inv_freq(c.rope, c.head_dim)
        freqs = torch.outer(torch.arange(c.max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = emb.cos().to(device=device, dtype=dtype)
        self.rope_sin = emb.sin().to(device=device, dtype=dtype)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Float32 logits for the tokens in batch.logits_index."""
        c = self.config
        num_tokens = batch.num_tokens
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]
        h = F.embedding(batch.input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            q, k, v = layer.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(num_tokens, c.num_heads, c.head_dim)
            k = k.view(num_tokens, c.num_kv_heads, c.head_dim)
            v = v.view(num_tokens, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            h = h + layer.o_proj(attn.forward(q, k, v, i))
            gate, up = layer.gate_up(rms_norm(h, layer.post_norm, c.rms_norm_eps)).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        h = rms_norm(h[batch.logits_index], self.norm, c.rms_norm_eps)
        return self.lm_head(h).float()


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    path = Path(path)
    config = ModelConfig.from_dir(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                weights[name] = sf.get_tensor(name)
    missing = _required_weights(config) - weights.keys()
    if missing:
        raise ValueError(f"{path}: weights missing from the safetensors files: {sorted(missing)[:5]}")
    return LlamaForCausalLM(config, weights, dtype, device)


def _required_weights(c: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        names |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    return names
