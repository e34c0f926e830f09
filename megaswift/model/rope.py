"""RoPE frequencies taken from transformers, so every `rope_type` it knows is carried over exactly.

megatron-core's `RotaryEmbedding` only knows the default frequencies, linear interpolation and a
llama3 variant with fixed constants. transformers is the reference implementation of each family,
so the inverse frequencies are computed with its `ROPE_INIT_FUNCTIONS` (llama3, linear, yarn,
dynamic at its base length, longrope...) and written into megatron's module. YaRN's attention
factor scales cos/sin; megatron's attention applies it when the config declares
`yarn_rotary_scaling_factor` (:func:`yarn_scaling_factor`, used by model/config.py).
"""

from __future__ import annotations

import math

import torch


def rope_parameters(hf_config) -> dict:
    """The RoPE parameters of an HF config, in transformers 5 or 4 spelling."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4: rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return dict(params)


def inv_freq_and_attention_factor(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2], attention factor) exactly as transformers computes them."""
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = float(params["rope_theta"])
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
        return 1.0 / (base ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} in config.json is not known to transformers; "
                         f"known: {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(attention_factor)


def yarn_scaling_factor(hf_config, head_dim: int) -> float | None:
    """YaRN's scaling factor when transformers scales attention for `hf_config` (None otherwise).

    megatron-core's attention applies YaRN's default factor ``0.1 * ln(factor) + 1`` when its config
    declares ``yarn_rotary_scaling_factor`` (model/config.py builds such a config); any other
    attention factor is refused.
    """
    _, attention_factor = inv_freq_and_attention_factor(hf_config, head_dim)
    if math.isclose(attention_factor, 1.0):
        return None
    factor = float(rope_parameters(hf_config).get("factor", 1.0))
    expected = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    if not math.isclose(attention_factor, expected, rel_tol=1e-6):
        raise ValueError(
            f"rope attention_factor {attention_factor} differs from YaRN's default "
            f"0.1*ln({factor})+1; megatron-core applies only the default")
    return factor


def install_rope(model, hf_config, config) -> None:
    """Replace the GPTModel's RoPE frequencies with transformers' for `hf_config`."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    inv_freq, _ = inv_freq_and_attention_factor(hf_config, config.kv_channels)
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
