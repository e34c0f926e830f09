"""Tiny random HF models of each supported family, built offline by transformers and saved."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=250, max_position_embeddings=256, rms_norm_eps=1e-6)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        num_key_value_heads=1)),  # MQA
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=96, num_attention_heads=6,
                                                      num_key_value_heads=2)),  # 3 heads a group
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, num_key_value_heads=2)),
    # MoE: 4 experts, top-2; Qwen3-MoE with a dense layer between MoE layers
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1], head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(   # shared expert + its gate, top-k kept as is
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            intermediate_size=48, sliding_window=None)),
    # multi-latent attention + fine-grained MoE, 3 layers: one dense, then MoE with a shared expert.
    # V3: q latent, YaRN with mscale != mscale_all_dim (both cos/sin and softmax scaled), sigmoid
    # router with a non-zero score-correction bias, 2 groups of 2 experts (one picked), scaled weights
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                           "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1})),
    # V2-Lite-like: no q latent (plain q_proj), default RoPE, softmax router, top-k weights as they are
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, topk_method="greedy",
        moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.5,
        norm_topk_prob=False)),
}


def make_tiny_model(name: str, out: Path, dtype=torch.float32, seed: int = 0,
                    tokenizer_dir: Path | None = None) -> Path:
    """Save a tiny random HF model of family `name` into `out`; returns `out`.

    With `tokenizer_dir`, that tokenizer is saved alongside and the vocab sized to it, so the
    model can be trained on real text.
    """
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[name]
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        extra = {**extra, "vocab_size": len(tokenizer)}
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped mapping cannot pass
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
        for n, b in model.named_buffers():  # DeepSeek-V3's router score correction: a buffer
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
