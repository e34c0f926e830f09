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
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
