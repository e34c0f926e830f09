"""The transformer layer spec: TransformerEngine's on CUDA with TE, a local one with TE's names otherwise.

Both specs produce the same parameter names (`linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`, `q_layernorm.weight` ...), so one converter serves both and a
checkpoint written on a CPU laptop loads on a GPU cluster and back.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megaswift.model.core_attention import CoreAttention
from megaswift.model.layers import LayerNormColumnParallelLinear
from megaswift.model.norm import RMSNorm
from megaswift.runtime.context import current as current_runtime


def local_layer_spec(qk_layernorm: bool) -> ModuleSpec:
    """A dense GPT layer from megatron-core modules plus ours, with TE's parameter names."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=LayerNormColumnParallelLinear,
                    core_attention=CoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm if qk_layernorm else IdentityOp,
                    k_layernorm=RMSNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=LayerNormColumnParallelLinear,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config, num_layers_on_stage: int):
    """The decoder block spec for this pipeline stage (layer spec x layers, final norm)."""
    if current_runtime().transformer_impl == "transformer_engine":
        layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        layer, norm = local_layer_spec(config.qk_layernorm), RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_on_stage, layer_norm=norm)
