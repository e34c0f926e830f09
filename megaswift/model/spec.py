"""The transformer layer spec: TransformerEngine's on CUDA with TE, a local one with TE's names otherwise.

Both specs produce the same parameter names (`linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`, `q_layernorm.weight` ...), so one converter serves both and a
checkpoint written on a CPU laptop loads on a GPU cluster and back.
"""

from __future__ import annotations

import os

import torch
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


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine() -> bool:
    """TE when present with CUDA, unless `MEGASWIFT_TRANSFORMER_IMPL=local` asks otherwise."""
    impl = os.environ.get("MEGASWIFT_TRANSFORMER_IMPL", "auto")
    if impl not in ("auto", "local", "transformer_engine"):
        raise ValueError(f"MEGASWIFT_TRANSFORMER_IMPL={impl!r}: use auto, local or transformer_engine")
    if impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError("MEGASWIFT_TRANSFORMER_IMPL=transformer_engine needs CUDA and "
                           "transformer-engine (pip install 'megaswift[gpu]')")
    return impl != "local" and transformer_engine_available()


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
    if use_transformer_engine():
        layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        layer, norm = local_layer_spec(config.qk_layernorm), RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_on_stage, layer_norm=norm)
