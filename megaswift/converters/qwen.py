"""Qwen2 (always a QKV bias) and Qwen3 (q/k RMSNorm, head_dim independent of hidden/heads)."""

from megaswift.converters.family import Family

QWEN2 = Family(name="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
               default_qkv_bias=True)
QWEN3 = Family(name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
               qk_layernorm=True)
