"""DeepSeek-V2 and DeepSeek-V3: multi-latent attention and fine-grained MoE.

Attention (MLA): HF's `q_a_proj` / `q_a_layernorm` / `q_b_proj` (or a plain `q_proj` where
`q_lora_rank` is null, as in V2-Lite), `kv_a_proj_with_mqa` / `kv_a_layernorm` / `kv_b_proj` and
`o_proj` are megatron's MLA linears under TE's names; the rows keep their order (per head
[nope | rope] in the q and kv up projections, [latent | rope] in the kv down projection).
The rope rows stay interleaved: megatron's MLA de-interleaves them before rotating, as
transformers' DeepSeek code does (V3's `rope_interleave`, V2's complex rotation).

MoE: the first `first_k_dense_replace` layers dense, the rest MoE with `n_shared_experts` shared
experts (one MLP of n_shared * moe_intermediate_size, no gate). Routers: V2 softmax over all
experts, top-k weights kept as they are (`pre_softmax`); V3 sigmoid scores, the choice made on
scores + `e_score_correction_bias` (megatron's `router.expert_bias` buffer), the chosen scores
renormalised; both scaled by `routed_scaling_factor`, both optionally group-limited.

Multi-token-prediction layers of a V3 checkpoint (numbered from num_hidden_layers on) are not
converted: they are counted and logged (`Family.dropped`); transformers does not load them either.
"""

from __future__ import annotations

from megaswift.converters.family import HF_LAYER, LAYER, Family, MoENames, moe_fields, moe_mlp
from megaswift.converters.mappings import Mapping, Rename
from megaswift.converters.sharding import Shard

ATTN = LAYER + "self_attention."
HF_ATTN = HF_LAYER + "self_attn."


def mla_attention(hf_config) -> list[Mapping]:
    """One MLA layer's mappings, its input norm included."""
    from megaswift.model.spec import mla_down_projections_split

    down = Shard.COLUMN if mla_down_projections_split() else Shard.REPLICATED
    maps = [
        Rename(LAYER + "input_layernorm.weight", hf=HF_LAYER + "input_layernorm.weight"),
        Rename(ATTN + "linear_kv_down_proj.weight", hf=HF_ATTN + "kv_a_proj_with_mqa.weight", shard=down),
        Rename(ATTN + "linear_kv_up_proj.layer_norm_weight", hf=HF_ATTN + "kv_a_layernorm.weight"),
        Rename(ATTN + "linear_kv_up_proj.weight", hf=HF_ATTN + "kv_b_proj.weight", shard=Shard.COLUMN),
        Rename(ATTN + "linear_proj.weight", hf=HF_ATTN + "o_proj.weight", shard=Shard.ROW),
    ]
    if hf_config.q_lora_rank is None:
        return maps + [Rename(ATTN + "linear_q_proj.weight", hf=HF_ATTN + "q_proj.weight", shard=Shard.COLUMN)]
    return maps + [
        Rename(ATTN + "linear_q_down_proj.weight", hf=HF_ATTN + "q_a_proj.weight", shard=down),
        Rename(ATTN + "linear_q_up_proj.layer_norm_weight", hf=HF_ATTN + "q_a_layernorm.weight"),
        Rename(ATTN + "linear_q_up_proj.weight", hf=HF_ATTN + "q_b_proj.weight", shard=Shard.COLUMN),
    ]


def _mla_fields(cfg) -> dict:
    from megaswift.model.rope import mla_rope_fields

    return dict(multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, kv_channels=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                num_query_groups=cfg.num_attention_heads, **mla_rope_fields(cfg))


def _moe_layers(cfg) -> list[int]:
    """transformers' rule: layer i is MoE from `first_k_dense_replace` on."""
    return [int(i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)]


def _groups(cfg) -> dict:
    """Group-limited routing fields; none where there is one group (no limit)."""
    if (cfg.n_group or 1) <= 1:
        return {}
    return dict(groups=cfg.n_group, group_topk=cfg.topk_group)


def _v3_config(cfg) -> dict:
    return {**_mla_fields(cfg), **moe_fields(
        cfg, num_experts=cfg.n_routed_experts, topk=cfg.num_experts_per_tok, ffn=cfg.moe_intermediate_size,
        moe_layers=_moe_layers(cfg), pre_softmax=False, shared=(cfg.n_shared_experts or 0) * cfg.moe_intermediate_size,
        score_function="sigmoid", expert_bias=True, scaling=float(cfg.routed_scaling_factor), **_groups(cfg)),
        "moe_router_dtype": "fp32"}  # transformers routes in float32


def _v2_config(cfg) -> dict:
    groups = _groups(cfg) if cfg.topk_method == "group_limited_greedy" else {}
    return {**_mla_fields(cfg), **moe_fields(
        cfg, num_experts=cfg.n_routed_experts, topk=cfg.num_experts_per_tok, ffn=cfg.moe_intermediate_size,
        moe_layers=_moe_layers(cfg), pre_softmax=True, shared=(cfg.n_shared_experts or 0) * cfg.moe_intermediate_size,
        scaling=float(cfg.routed_scaling_factor), **groups),
        "moe_router_dtype": "fp32"}


def _common_unsupported(cfg) -> str | None:
    from megaswift.model.rope import mla_rope_fields

    if getattr(cfg, "attention_bias", False):
        return ("attention_bias=true: megatron-core's multi-latent attention has no biases on its "
                "down projections")
    if (getattr(cfg, "moe_layer_freq", 1) or 1) != 1:
        return (f"moe_layer_freq={cfg.moe_layer_freq}: transformers makes every layer from "
                "first_k_dense_replace on an MoE layer; a checkpoint with another pattern is ambiguous")
    if not cfg.n_routed_experts or not cfg.num_experts_per_tok:
        return "n_routed_experts and num_experts_per_tok must be set in config.json"
    try:
        mla_rope_fields(cfg)
    except ValueError as e:
        return str(e)
    return None


def _v3_unsupported(cfg) -> str | None:
    problem = _common_unsupported(cfg)
    if problem:
        return problem
    if getattr(cfg, "rope_interleave", True) is False:
        return ("rope_interleave=false: megatron-core's multi-latent attention always de-interleaves "
                "the rope rows (rope_interleave=true, DeepSeek's own layout)")
    if getattr(cfg, "scoring_func", "sigmoid") != "sigmoid":
        return f"scoring_func={cfg.scoring_func!r}: transformers' DeepSeek-V3 router always uses sigmoid"
    topk = cfg.num_experts_per_tok
    if bool(cfg.norm_topk_prob) != (topk > 1):
        return (f"norm_topk_prob={cfg.norm_topk_prob} with num_experts_per_tok={topk}: megatron-core's "
                "sigmoid router renormalises the top-k scores exactly when top-k > 1")
    if (cfg.n_group or 1) > 1 and topk // cfg.topk_group != 2:
        return (f"n_group={cfg.n_group}, topk_group={cfg.topk_group}, num_experts_per_tok={topk}: transformers "
                "scores a group by its top-2 experts, megatron-core by its top (num_experts_per_tok // "
                "topk_group); they agree only when that is 2")
    return None


def _v2_unsupported(cfg) -> str | None:
    problem = _common_unsupported(cfg)
    if problem:
        return problem
    if getattr(cfg, "scoring_func", "softmax") != "softmax":
        return f"scoring_func={cfg.scoring_func!r}: transformers' DeepSeek-V2 router always uses softmax"
    if cfg.norm_topk_prob:
        return ("norm_topk_prob=true: transformers' DeepSeek-V2 router ignores it while DeepSeek's own "
                "code renormalises the top-k weights; the checkpoint's routing is ambiguous")
    if cfg.topk_method not in ("greedy", "group_limited_greedy"):
        return f"topk_method={cfg.topk_method!r}: only greedy and group_limited_greedy are supported"
    if cfg.topk_method == "group_limited_greedy" and (cfg.n_group or 1) > 1:
        per_group = cfg.n_routed_experts // cfg.n_group
        if cfg.num_experts_per_tok // cfg.topk_group != 1 or cfg.num_experts_per_tok > cfg.topk_group * per_group:
            return (f"topk_method=group_limited_greedy with n_group={cfg.n_group}, topk_group={cfg.topk_group}, "
                    f"num_experts_per_tok={cfg.num_experts_per_tok}: transformers scores a group by its best "
                    "expert, megatron-core by its top (num_experts_per_tok // topk_group); they agree only "
                    "when that is 1")
    return None


def _mtp_layers(cfg) -> tuple[str, str] | None:
    """V3's multi-token-prediction layers: HF tensors `model.layers.{L..L+n-1}.*` (L = num_hidden_layers)."""
    n = int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
    if not n:
        return None
    first = cfg.num_hidden_layers
    numbers = "|".join(str(first + i) for i in range(n))
    return (rf"^model\.layers\.({numbers})\.",
            f"{n} multi-token-prediction layer(s) (num_nextn_predict_layers): not converted, as transformers "
            "does not load them")


_ATTENTION = dict(qk_layernorm=True, attention=mla_attention)  # q/kv latent norms fused into the up projections

DEEPSEEK_V3 = Family(name="deepseek_v3", model_types=("deepseek_v3",), architecture="DeepseekV3ForCausalLM",
                     **_ATTENTION, unsupported=_v3_unsupported, transformer_config=_v3_config,
                     mlp=moe_mlp(MoENames(shared="shared_experts", expert_bias="gate.e_score_correction_bias")),
                     dropped=_mtp_layers)
DEEPSEEK_V2 = Family(name="deepseek_v2", model_types=("deepseek_v2",), architecture="DeepseekV2ForCausalLM",
                     **_ATTENTION, unsupported=_v2_unsupported, transformer_config=_v2_config,
                     mlp=moe_mlp(MoENames(shared="shared_experts")), dropped=_mtp_layers)
