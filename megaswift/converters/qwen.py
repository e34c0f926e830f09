"""Qwen2 (always a QKV bias), Qwen3 (q/k RMSNorm, head_dim independent of hidden/heads), and
their MoE versions: Qwen3-MoE (routed experts, dense layers where `mlp_only_layers` or
`decoder_sparse_step` say) and Qwen2-MoE (plus a shared expert behind a sigmoid gate)."""

from megaswift.converters.family import Family, MoENames, moe_fields, moe_mlp

QWEN2 = Family(name="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
               default_qkv_bias=True)
QWEN3 = Family(name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
               qk_layernorm=True)


def _qwen_moe_layers(cfg) -> list[int]:
    """transformers' rule: a layer is sparse unless listed in `mlp_only_layers`, and only every
    `decoder_sparse_step`-th layer is."""
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [int(i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0)
            for i in range(cfg.num_hidden_layers)]


def _qwen_moe_config(cfg) -> dict:
    shared = getattr(cfg, "shared_expert_intermediate_size", None)
    return moe_fields(cfg, num_experts=cfg.num_experts, topk=cfg.num_experts_per_tok,
                      ffn=cfg.moe_intermediate_size, moe_layers=_qwen_moe_layers(cfg),
                      pre_softmax=not getattr(cfg, "norm_topk_prob", False),
                      shared=shared, shared_gate=bool(shared))


QWEN3_MOE = Family(name="qwen3_moe", model_types=("qwen3_moe",), architecture="Qwen3MoeForCausalLM",
                   qk_layernorm=True, mlp=moe_mlp(MoENames()), transformer_config=_qwen_moe_config)
QWEN2_MOE = Family(name="qwen2_moe", model_types=("qwen2_moe",), architecture="Qwen2MoeForCausalLM",
                   default_qkv_bias=True,
                   mlp=moe_mlp(MoENames(shared="shared_expert", shared_gate="shared_expert_gate")),
                   transformer_config=_qwen_moe_config)
