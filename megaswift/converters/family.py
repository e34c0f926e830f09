"""A model family: which HF configs it covers and its mappings, as data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from megaswift.converters.mappings import QKV, GatedMLP, Mapping, Rename, VocabRows
from megaswift.converters.sharding import Shard

LAYER = "decoder.layers.*."
HF_LAYER = "model.layers.*."


def dense_decoder(*, qkv_bias: bool, qk_norm: bool, tied: bool) -> list[Mapping]:
    """The Llama-style decoder shared by llama, mistral, qwen2, qwen3 (and MoE families' attention)."""
    attn = HF_LAYER + "self_attn."
    maps: list[Mapping] = [
        VocabRows("embedding.word_embeddings.weight", hf="model.embed_tokens.weight"),
        Rename(LAYER + "self_attention.linear_qkv.layer_norm_weight", hf=HF_LAYER + "input_layernorm.weight"),
        QKV(LAYER + "self_attention.linear_qkv.weight",
            q=attn + "q_proj.weight", k=attn + "k_proj.weight", v=attn + "v_proj.weight"),
        Rename(LAYER + "self_attention.linear_proj.weight", hf=attn + "o_proj.weight", shard=Shard.ROW),
        Rename(LAYER + "mlp.linear_fc1.layer_norm_weight", hf=HF_LAYER + "post_attention_layernorm.weight"),
        GatedMLP(LAYER + "mlp.linear_fc1.weight",
                 gate=HF_LAYER + "mlp.gate_proj.weight", up=HF_LAYER + "mlp.up_proj.weight"),
        Rename(LAYER + "mlp.linear_fc2.weight", hf=HF_LAYER + "mlp.down_proj.weight", shard=Shard.ROW),
        Rename("decoder.final_layernorm.weight", hf="model.norm.weight"),
        VocabRows("output_layer.weight", hf="model.embed_tokens.weight" if tied else "lm_head.weight"),
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
    """One HF model family: the `model_type`s it covers, its config flags and its mappings."""
    name: str
    model_types: tuple[str, ...]
    architecture: str
    qk_layernorm: bool = False
    default_qkv_bias: bool = False
    unsupported: Callable[[object], str | None] = field(default=lambda cfg: None)

    def qkv_bias(self, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", self.default_qkv_bias))

    def check(self, hf_config) -> None:
        """Raise a clear error for config features this family's converter does not carry."""
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError(f"{self.name}: mlp_bias=true in config.json is not supported")
        problem = self.unsupported(hf_config)
        if problem:
            raise ValueError(f"{self.name}: {problem}")

    def mappings(self, hf_config) -> list[Mapping]:
        return dense_decoder(qkv_bias=self.qkv_bias(hf_config), qk_norm=self.qk_layernorm,
                             tied=bool(getattr(hf_config, "tie_word_embeddings", False)))


def compile_patterns(mappings: list[Mapping]) -> list[tuple[re.Pattern, Mapping]]:
    """Regexes that match a concrete MCore name and capture its layer index."""
    out = []
    for m in mappings:
        pattern = re.escape(m.mcore).replace(r"\*", r"(\d+)")
        out.append((re.compile(f"^{pattern}$"), m))
    return out
