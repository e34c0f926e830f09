"""RMSNorm with the exact arithmetic of transformers' Llama/Qwen RMSNorm.

Computing in float32 and casting back before the weight multiply (as transformers does) is what
makes MCore logits match the HF reference to float precision; `torch.nn.RMSNorm` multiplies in
float32 and differs in bf16 by one rounding.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' `LlamaRMSNorm.forward`, as a function."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RMSNorm(nn.Module):
    """Drop-in for megatron-core's norm modules (`TENorm`, `WrappedTorchNorm`) on the non-TE path.

    Signature as megatron builds norms: `(config, hidden_size, eps)`. Unlike `WrappedTorchNorm`
    it supports sequence parallel: the weight is marked `sequence_parallel` so megatron-core
    all-reduces its gradient over the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
