"""The forward pass's matrix products (x @ W.T + b), behind one interface chosen per device.

On CPU the weights are reordered once at load into oneDNN's blocked layout ("prepacked", as IPEX and
vLLM's CPU backend do), which runs the small-row products of decode and the vocabulary projection up
to 2x faster than F.linear's MKL path on this class of machine (measured in the issue 10 note).
Elsewhere (CUDA, half precision: oneDNN packs those only on CPUs with native 16-bit dot products, and
where it does not pack them F.linear runs them as fast) it is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.prepacked = (weight.device.type == "cpu" and weight.dtype == torch.float32
                          and torch.backends.mkldnn.is_available())
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.prepacked else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
