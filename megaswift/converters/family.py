"""A model family: which HF configs it covers, its config fields and its mappings, as data.

Mapping names are patterns with two placeholders, filled with *global* indices on both sides:

- `*`   the decoder layer: `decoder.layers.*.mlp.linear_fc2.weight` <-> `model.layers.*.mlp.down_proj.weight`
- `{E}` the routed expert, beside the layer:
  `decoder.layers.*.mlp.experts.local_experts.{E}.linear_fc1.weight` (megatron's SequentialMLP;
  TEGroupedMLP's is `decoder.layers.*.mlp.experts.linear_fc1.weight{E}`) <->
  `model.layers.*.mlp.experts.{E}.gate_proj.weight` / `...up_proj.weight`.
  Expert mappings say `axis=Axis.EXPERT_TP`: expert-tensor parallel splits them, and each
  expert-parallel rank holds its own experts (the engine turns local expert numbers into global).

The MCore side is always the base name: wrappers such as LoRA's are removed before matching
(`names.canonical`). It may name a persistent buffer as well as a parameter (the router's
`expert_bias`): the engine converts both alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from megaswift.converters.mappings import Float32Rename, QKV, GatedMLP, Mapping, Rename, VocabRows
from megaswift.converters.sharding import Axis, Shard

LAYER = "decoder.layers.*."
HF_LAYER = "model.layers.*."


def dense_mlp(hf_config) -> list[Mapping]:
    """A dense layer's SwiGLU MLP, its pre-norm fused into fc1 (as TE's LayerNormColumnParallelLinear)."""
    return [
        Rename(LAYER + "mlp.linear_fc1.layer_norm_weight", hf=HF_LAYER + "post_attention_layernorm.weight"),
        GatedMLP(LAYER + "mlp.linear_fc1.weight",
                 gate=HF_LAYER + "mlp.gate_proj.weight", up=HF_LAYER + "mlp.up_proj.weight"),
        Rename(LAYER + "mlp.linear_fc2.weight", hf=HF_LAYER + "mlp.down_proj.weight", shard=Shard.ROW),
    ]


@dataclass(frozen=True)
class MoENames:
    """Where a family's HF checkpoint keeps an MoE layer's parts (under `model.layers.N.`)."""
    block: str = "mlp"                    # the MoE block: `mlp` (Qwen, DeepSeek), `block_sparse_moe` (Mixtral)
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")   # Mixtral: w1, w3, w2
    shared: str | None = None             # shared expert MLP: `shared_expert` (Qwen2), `shared_experts` (DeepSeek)
    shared_gate: str | None = None        # its sigmoid gate: `shared_expert_gate` (Qwen2-MoE)
    expert_bias: str | None = None        # the router's score correction (a buffer in both): DeepSeek-V3's
    #                                       `gate.e_score_correction_bias` <-> megatron's `router.expert_bias`


def moe_mlp(names: MoENames):
    """An MoE family's MLP mappings: the dense SwiGLU for its dense layers, and for MoE layers
    the pre-MLP norm, the router, the routed experts (per expert, split over expert-TP) and the
    shared expert (a dense MLP under TP). A layer's MCore parameters pick which apply."""
    block = HF_LAYER + names.block + "."
    gate, up, down = names.expert
    expert = block + "experts.{E}."

    def declare(hf_config) -> list[Mapping]:
        maps = dense_mlp(hf_config) + [
            Rename(LAYER + "pre_mlp_layernorm.weight", hf=HF_LAYER + "post_attention_layernorm.weight"),
            Rename(LAYER + "mlp.router.weight", hf=block + "gate.weight"),
        ]
        # megatron's SequentialMLP (local and TE without grouped GEMM) and TEGroupedMLP name the
        # same tensors differently; both are declared, so checkpoints of either path convert.
        for fc1, fc2 in ((LAYER + "mlp.experts.local_experts.{E}.linear_fc1.weight",
                          LAYER + "mlp.experts.local_experts.{E}.linear_fc2.weight"),
                         (LAYER + "mlp.experts.linear_fc1.weight{E}", LAYER + "mlp.experts.linear_fc2.weight{E}")):
            maps += [GatedMLP(fc1, gate=expert + gate + ".weight", up=expert + up + ".weight", axis=Axis.EXPERT_TP),
                     Rename(fc2, hf=expert + down + ".weight", shard=Shard.ROW, axis=Axis.EXPERT_TP)]
        if names.shared:
            shared = block + names.shared + "."
            maps += [GatedMLP(LAYER + "mlp.shared_experts.linear_fc1.weight",
                              gate=shared + "gate_proj.weight", up=shared + "up_proj.weight"),
                     Rename(LAYER + "mlp.shared_experts.linear_fc2.weight", hf=shared + "down_proj.weight",
                            shard=Shard.ROW)]
        if names.shared_gate:
            maps.append(Rename(LAYER + "mlp.shared_experts.gate_weight", hf=block + names.shared_gate + ".weight"))
        if names.expert_bias:
            maps.append(Float32Rename(LAYER + "mlp.router.expert_bias", hf=block + names.expert_bias))
        return maps

    return declare


def moe_fields(hf_config, *, num_experts: int, topk: int, ffn: int, moe_layers: list[int],
               pre_softmax: bool, shared: int | None = None, shared_gate: bool = False,
               score_function: str = "softmax", expert_bias: bool = False, scaling: float | None = None,
               groups: int | None = None, group_topk: int | None = None) -> dict[str, Any]:
    """The TransformerConfig fields of an MoE model, as read from its config.json.

    `moe_layers` is the 0/1 pattern over all decoder layers (1: MoE); `pre_softmax` True when
    the HF router takes softmax over all experts and keeps the top-k probabilities as they are,
    False when it renormalises them (the same as megatron's softmax over the top-k logits).
    `score_function` "sigmoid" with `expert_bias` is DeepSeek-V3's router (sigmoid scores, a
    correction bias for the choice only, the chosen scores renormalised); `scaling` multiplies the
    routing weights; `groups`/`group_topk` limit each token to its best expert groups.
    """
    if len(moe_layers) != hf_config.num_hidden_layers:
        raise ValueError(f"MoE layer pattern has {len(moe_layers)} entries for "
                         f"{hf_config.num_hidden_layers} layers")
    return dict(num_moe_experts=num_experts, moe_ffn_hidden_size=ffn, moe_router_topk=topk,
                moe_layer_freq=list(moe_layers), moe_router_pre_softmax=pre_softmax,
                moe_shared_expert_intermediate_size=shared or None, moe_shared_expert_gate=shared_gate,
                moe_router_score_function=score_function, moe_router_enable_expert_bias=expert_bias,
                moe_router_topk_scaling_factor=scaling, moe_router_num_groups=groups,
                moe_router_group_topk=group_topk)


def decoder(*, attention: list[Mapping], tied: bool, mlp: list[Mapping]) -> list[Mapping]:
    """The decoder every family shares: embedding, each layer's `attention` and `mlp` (with their
    pre-norms), final norm and output layer."""
    return [
        VocabRows("embedding.word_embeddings.weight", hf="model.embed_tokens.weight"),
        *attention,
        *mlp,
        Rename("decoder.final_layernorm.weight", hf="model.norm.weight"),
        VocabRows("output_layer.weight", hf="model.embed_tokens.weight" if tied else "lm_head.weight"),
    ]


def gqa_attention(*, qkv_bias: bool, qk_norm: bool) -> list[Mapping]:
    """Llama-style attention (llama, mistral, qwen2, qwen3 and their MoE versions): fused QKV with
    the input norm fused into it, optional QKV bias and q/k norms."""
    attn = HF_LAYER + "self_attn."
    maps: list[Mapping] = [
        Rename(LAYER + "self_attention.linear_qkv.layer_norm_weight", hf=HF_LAYER + "input_layernorm.weight"),
        QKV(LAYER + "self_attention.linear_qkv.weight",
            q=attn + "q_proj.weight", k=attn + "k_proj.weight", v=attn + "v_proj.weight"),
        Rename(LAYER + "self_attention.linear_proj.weight", hf=attn + "o_proj.weight", shard=Shard.ROW),
    ]
    if qkv_bias:
        maps.append(QKV(LAYER + "self_attention.linear_qkv.bias",
                        q=attn + "q_proj.bias", k=attn + "k_proj.bias", v=attn + "v_proj.bias"))
    if qk_norm:
        maps += [Rename(LAYER + "self_attention.q_layernorm.weight", hf=attn + "q_norm.weight"),
                 Rename(LAYER + "self_attention.k_layernorm.weight", hf=attn + "k_norm.weight")]
    return maps


@dataclass(frozen=True)
class Family:
    """One HF model family: the `model_type`s it covers, its config flags and its mappings.

    `attention(hf_config)` declares each layer's attention with its input norm (Llama-style
    GQA by default; DeepSeek's multi-latent attention). `mlp(hf_config)` declares each layer's MLP
    (dense by default; an MoE family's router, experts and shared experts).
    `transformer_config(hf_config)` returns family-specific TransformerConfig fields (MoE sizes,
    router settings ...), merged over the shared ones. `dropped(hf_config)` names HF tensors the
    family knowingly leaves out, as (regex, why): they are counted and logged, not converted.
    """
    name: str
    model_types: tuple[str, ...]
    architecture: str
    qk_layernorm: bool = False
    default_qkv_bias: bool = False
    unsupported: Callable[[object], str | None] = field(default=lambda cfg: None)
    attention: Callable[[object], list[Mapping]] | None = None
    mlp: Callable[[object], list[Mapping]] = field(default=dense_mlp)
    transformer_config: Callable[[object], dict[str, Any]] = field(default=lambda cfg: {})
    dropped: Callable[[object], tuple[str, str] | None] = field(default=lambda cfg: None)

    def qkv_bias(self, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", self.default_qkv_bias))

    def check(self, hf_config) -> None:
        """Raise a clear error for config features this family's converter does not carry."""
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError(f"{self.name}: mlp_bias=true in config.json is not supported")
        problem = self.unsupported(hf_config)
        if problem:
            raise ValueError(f"{self.name}: {problem}")

    def config_fields(self, hf_config) -> dict[str, Any]:
        """The TransformerConfig fields this family decides: its attention flags and its hook's."""
        return {"add_qkv_bias": self.qkv_bias(hf_config), "qk_layernorm": self.qk_layernorm,
                **self.transformer_config(hf_config)}

    def num_experts(self, hf_config) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return int(self.transformer_config(hf_config).get("num_moe_experts") or 0)

    def mappings(self, hf_config) -> list[Mapping]:
        attention = (self.attention(hf_config) if self.attention else
                     gqa_attention(qkv_bias=self.qkv_bias(hf_config), qk_norm=self.qk_layernorm))
        return decoder(attention=attention, tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
                       mlp=self.mlp(hf_config))
