"""The transformer layer spec: TransformerEngine's on CUDA with TE, a local one with TE's names otherwise.

Both specs produce the same parameter names (`linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`, `q_layernorm.weight` ...), so one converter serves both and a
checkpoint written on a CPU laptop loads on a GPU cluster and back.

Multi-latent attention (DeepSeek) as TE's spec builds it: a separate `input_layernorm` (two down
projections read the normed input), the q and kv latent norms fused into the up projections
(`linear_q_up_proj.layer_norm_weight`, `linear_kv_up_proj.layer_norm_weight`). One difference
remains: megatron's MLA accepts only TE's `TELinear` ('duplicated': whole on every TP rank) or a
`ColumnParallelLinear` (split, its output gathered) as down projection, so the local spec splits
`linear_q_down_proj` / `linear_kv_down_proj` over TP where TE keeps them whole. The names and
full tensors are the same; `mla_down_projections_split` tells the converter which applies.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (TransformerLayer, TransformerLayerSubmodules,
                                                         get_transformer_layer_offset)

from megaswift.model.core_attention import CoreAttention
from megaswift.model.layers import LayerNormColumnParallelLinear
from megaswift.model.norm import RMSNorm
from megaswift.runtime.context import current as current_runtime


def local_moe_mlp_spec() -> ModuleSpec:
    """megatron-core's MoE layer with SequentialMLP experts and a shared-expert MLP, from the
    portable linears: TE's non-grouped MoE spec has the same parameter names."""
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(
        experts=ModuleSpec(module=SequentialMLP, submodules=mlp),
        shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp)))


def mla_down_projections_split() -> bool:
    """True where this runtime's layer spec splits MLA's down projections over TP (the local
    spec's ColumnParallelLinear), False where TE's spec keeps them whole (see the module doc)."""
    return current_runtime().transformer_impl != "transformer_engine"


def _gqa_attention_spec(qk_layernorm: bool) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=LayerNormColumnParallelLinear,
            core_attention=CoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=RMSNorm if qk_layernorm else IdentityOp,
            k_layernorm=RMSNorm if qk_layernorm else IdentityOp,
        ),
    )


def _mla_attention_spec(qk_layernorm: bool) -> ModuleSpec:
    """megatron's MLASelfAttention, latent norms fused into the up projections as TE's spec does."""
    up = LayerNormColumnParallelLinear if qk_layernorm else ColumnParallelLinear
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=up,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=up,
            core_attention=CoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            kv_layernorm=IdentityOp,
        ),
    )


def local_layer_spec(qk_layernorm: bool, moe: bool = False, mla: bool = False) -> ModuleSpec:
    """A GPT layer from megatron-core modules plus ours, with TE's parameter names.

    Dense: the pre-MLP norm is fused into fc1 (`mlp.linear_fc1.layer_norm_weight`); MoE: a
    separate `pre_mlp_layernorm` feeds the router, the experts and the shared expert. GQA
    attention fuses the input norm into `linear_qkv`; MLA keeps it as `input_layernorm`.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm if mla else IdentityOp,
            self_attention=_mla_attention_spec(qk_layernorm) if mla else _gqa_attention_spec(qk_layernorm),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm if moe else IdentityOp,
            mlp=local_moe_mlp_spec() if moe else ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=LayerNormColumnParallelLinear,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def moe_layer_pattern(config) -> list[int]:
    """1 for each decoder layer that is an MoE layer, 0 for a dense one (all 0 without experts)."""
    if not config.num_moe_experts:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(config.num_layers)]
    return list(freq)


def block_spec(config, num_layers_on_stage: int, vp_stage: int | None = None):
    """The decoder block spec for this pipeline stage (its layers' specs, final norm)."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    moe = moe_layer_pattern(config)[offset: offset + num_layers_on_stage]
    if current_runtime().transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        if config.num_moe_experts:
            return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
        layer = get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm, multi_latent_attention=config.multi_latent_attention)
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_on_stage, layer_norm=TENorm)
    specs = {m: local_layer_spec(config.qk_layernorm, moe=bool(m), mla=config.multi_latent_attention)
             for m in set(moe)}
    return TransformerBlockSubmodules(layer_specs=[specs[m] for m in moe], layer_norm=RMSNorm)
