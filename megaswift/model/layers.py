"""Non-TE linears that carry TE's parameter names.

TransformerEngine fuses the pre-norm into the following linear (`TELayerNormColumnParallelLinear`),
so TE checkpoints name the norm `self_attention.linear_qkv.layer_norm_weight` and
`mlp.linear_fc1.layer_norm_weight`. Megatron-SWIFT and Megatron-Bridge write those names. Using
the same names on CPU means one converter and one checkpoint format for every machine.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from torch import nn

from megaswift.model.norm import rms_norm


class LayerNormColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """RMSNorm followed by a column-parallel linear, parameter names as TE's.

    Returns `(output, bias)` like every megatron linear. The norm runs on the local sequence
    shard before the linear's all-gather, which is correct under sequence parallel because
    RMSNorm is per token; its weight is marked `sequence_parallel` so gradients get reduced.
    """

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        kwargs.pop("skip_weight_param_allocation", None)
        super().__init__(input_size, output_size, config=config, **kwargs)
        if config.normalization != "RMSNorm":
            raise ValueError(f"normalization {config.normalization!r} is not supported on the "
                             "non-TE path; only RMSNorm")
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        setattr(self.layer_norm_weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return super().forward(rms_norm(x, self.layer_norm_weight, self.eps), *args, **kwargs)
