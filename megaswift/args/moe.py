"""Mixture-of-experts and multi-latent-attention flags (Megatron-SWIFT names and defaults).

Flags that describe the model's shape (`--num_experts`, `--moe_ffn_hidden_size`,
`--moe_shared_expert_intermediate_size`, `--moe_layer_freq`, the MLA sizes) are read from
config.json; given on the command line they must agree with it, since the weights fix them.
Routing flags left at None take config.json's value (`Family.config_fields`), the others
megatron-core's behaviour with the seed's defaults. Speed-only options (`--moe_grouped_gemm`,
`--moe_permute_fusion`, `--moe_shared_expert_overlap`, flex / DeepEP dispatch) run as their
portable equivalent where the hardware lacks them (`runtime.context.moe_kernels`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(kw_only=True)
class MoEArgs:
    # the model's shape: from config.json
    num_experts: Optional[int] = field(default=None, metadata={"help": "Routed experts per MoE layer (from config.json)."})
    moe_ffn_hidden_size: Optional[int] = field(default=None, metadata={"help": "Each expert's FFN size (from config.json)."})
    moe_shared_expert_intermediate_size: Optional[int] = field(default=None, metadata={"help": "Shared experts' total FFN size (from config.json)."})
    moe_layer_freq: Optional[str] = field(default=None, metadata={"help": "MoE/dense layer pattern: N (every N-th layer) or a list like [0,1,1] (from config.json)."})
    # routing
    moe_router_topk: Optional[int] = field(default=None, metadata={"help": "Experts per token (from config.json)."})
    moe_router_pre_softmax: Optional[bool] = field(default=None, metadata={"help": "Softmax before top-k (from config.json)."})
    moe_router_dtype: str = field(default="fp32", metadata={"help": "Router and expert-weighting dtype: none|fp32|fp64.", "choices": ("none", "fp32", "fp64")})
    moe_router_score_function: Optional[str] = field(default=None, metadata={"help": "softmax|sigmoid (from config.json).", "choices": ("softmax", "sigmoid")})
    moe_router_bias_update_rate: float = field(default=1e-3, metadata={"help": "Expert-bias update rate of aux-loss-free balancing (DeepSeek-V3: 1e-3)."})
    moe_router_enable_expert_bias: Optional[bool] = field(default=None, metadata={"help": "Dynamic expert bias (aux-loss-free balancing; from config.json)."})
    moe_router_topk_scaling_factor: Optional[float] = field(default=None, metadata={"help": "Scale of the top-k routing weights (from config.json)."})
    moe_router_load_balancing_type: Optional[str] = field(default=None, metadata={"help": "aux_loss|seq_aux_loss|sinkhorn|none (default aux_loss).", "choices": ("aux_loss", "seq_aux_loss", "sinkhorn", "none")})
    moe_aux_loss_coeff: float = field(default=0.0, metadata={"help": "Load-balancing loss coefficient (0: not added to the loss)."})
    moe_z_loss_coeff: Optional[float] = field(default=None, metadata={"help": "Router z-loss coefficient."})
    moe_expert_capacity_factor: Optional[float] = field(default=None, metadata={"help": "Expert capacity factor (None: no token dropped)."})
    moe_token_drop_policy: str = field(default="probs", metadata={"help": "probs|position: which tokens an over-capacity expert drops.", "choices": ("probs", "position")})
    moe_pad_expert_input_to_capacity: bool = field(default=False, metadata={"help": "Pad each expert's input to its capacity."})
    # dispatch and kernels (speed only)
    moe_token_dispatcher_type: str = field(default="alltoall", metadata={"help": "allgather|alltoall|flex.", "choices": ("allgather", "alltoall", "flex")})
    moe_enable_deepep: bool = field(default=False, metadata={"help": "DeepEP dispatch (with --moe_token_dispatcher_type flex; GPU)."})
    moe_grouped_gemm: bool = field(default=False, metadata={"help": "TransformerEngine grouped GEMM over the local experts (GPU)."})
    moe_permute_fusion: bool = field(default=False, metadata={"help": "Fused token permutation (GPU, TransformerEngine)."})
    moe_shared_expert_overlap: bool = field(default=False, metadata={"help": "Overlap the shared expert with dispatch (GPU)."})
    # multi-latent attention: from config.json
    multi_latent_attention: Optional[bool] = field(default=None, metadata={"help": "Multi-latent attention (from config.json)."})
    q_lora_rank: Optional[int] = field(default=None, metadata={"help": "Query low-rank size (from config.json)."})
    kv_lora_rank: Optional[int] = field(default=None, metadata={"help": "Key/value low-rank size (from config.json)."})
    qk_head_dim: Optional[int] = field(default=None, metadata={"help": "Query/key head dim without rope (from config.json)."})
    qk_pos_emb_head_dim: Optional[int] = field(default=None, metadata={"help": "Rope part of the query/key head dim (from config.json)."})

    def __post_init__(self) -> None:
        if self.moe_expert_capacity_factor is not None and self.moe_expert_capacity_factor <= 0:
            self.moe_expert_capacity_factor = None  # megatron's meaning of a negative factor
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            raise ValueError("--moe_pad_expert_input_to_capacity true needs --moe_expert_capacity_factor")
        if self.moe_enable_deepep and self.moe_token_dispatcher_type != "flex":
            raise ValueError("--moe_enable_deepep true needs --moe_token_dispatcher_type flex")
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0) < 0:
            raise ValueError("--moe_aux_loss_coeff / --moe_z_loss_coeff must be >= 0")

    # -- against the model --------------------------------------------------------------------------
    _SHAPE = {"num_experts": "num_moe_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
              "moe_layer_freq": "moe_layer_freq", "multi_latent_attention": "multi_latent_attention",
              "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "qk_head_dim": "qk_head_dim",
              "qk_pos_emb_head_dim": "qk_pos_emb_head_dim"}
    _ROUTING = ("moe_router_topk", "moe_router_pre_softmax", "moe_router_score_function",
                "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
                "moe_router_load_balancing_type", "moe_z_loss_coeff", "moe_expert_capacity_factor")
    _ALWAYS = ("moe_router_bias_update_rate", "moe_aux_loss_coeff", "moe_token_drop_policy",
               "moe_pad_expert_input_to_capacity", "moe_token_dispatcher_type", "moe_enable_deepep",
               "moe_grouped_gemm", "moe_permute_fusion", "moe_shared_expert_overlap")

    def config_fields(self, model_fields: dict[str, Any]) -> dict[str, Any]:
        """TransformerConfig fields over the model's own (`Family.config_fields`): routing flags
        that were given, and the seed's defaults of the rest. Dense models get none."""
        for flag, key in self._SHAPE.items():
            given = getattr(self, flag)
            if given is None:
                continue
            have = model_fields.get(key)
            if flag == "moe_layer_freq":
                given = _layer_pattern(given, model_fields)
            elif flag == "multi_latent_attention":
                have = bool(have)
            if given != have:
                raise ValueError(f"--{flag} {getattr(self, flag)} does not match the model's config.json "
                                 f"({have}); the weights fix it: leave the flag out")
        if not model_fields.get("num_moe_experts"):
            return {}
        out = {k: getattr(self, k) for k in self._ROUTING if getattr(self, k) is not None}
        out.update({k: getattr(self, k) for k in self._ALWAYS})
        out["moe_router_dtype"] = None if self.moe_router_dtype == "none" else self.moe_router_dtype
        return out

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _layer_pattern(text: str, model_fields: dict[str, Any]) -> list[int]:
    """`--moe_layer_freq` as the 0/1 pattern over all layers: an int N, or a list ('[0,1,1]',
    Megatron-LM's `([0]*1+[1]*3)` style is evaluated as a Python list literal only)."""
    import ast

    n = len(model_fields.get("moe_layer_freq") or [])
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError):
        raise ValueError(f"--moe_layer_freq {text!r}: use an integer N or a list like [0,1,1]") from None
    if isinstance(value, int):
        return [int(i % value == 0) for i in range(n)]
    return [int(v) for v in value]
