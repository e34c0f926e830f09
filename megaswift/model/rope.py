"""RoPE frequencies taken from transformers, so every `rope_type` it knows is carried over exactly.

megatron-core's `RotaryEmbedding` only knows the default frequencies, linear interpolation and a
llama3 variant with fixed constants. transformers is the reference implementation of each family,
so the inverse frequencies are computed with its `ROPE_INIT_FUNCTIONS` (llama3, linear, yarn,
dynamic at its base length, longrope...) and written into megatron's module. YaRN's attention
factor scales cos/sin; megatron's attention applies it when the config declares
`yarn_rotary_scaling_factor` (:func:`yarn_scaling_factor`, used by model/config.py).

Multi-latent attention (DeepSeek) is the exception: each MLA layer owns its rotary embedding,
built from MLATransformerConfig's own fields (`rope_type` 'rope' or 'yarn', scaling factor,
beta_fast/slow, mscale and mscale_all_dim). :func:`mla_rope_fields` translates the HF parameters
into those; megatron computes the same inverse frequencies as transformers' YaRN, and the fields
are refused where its concentration factor would differ from transformers' attention factor.
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


def _yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's mscale, as transformers and megatron-core both define it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_rope_fields(hf_config) -> dict:
    """MLATransformerConfig's RoPE fields for the `qk_rope_head_dim` part of DeepSeek's heads.

    transformers takes the attention factor (cos/sin scale) as mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are set, else mscale(factor); and scales softmax by
    mscale(factor, mscale_all_dim)**2 when mscale_all_dim is set. megatron-core does the same with
    its `mscale` / `mscale_all_dim` fields, given mscale=1 where transformers ignores it.
    """
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    base = float(params["rope_theta"])
    if rope_type == "default":
        return dict(rope_type="rope", rotary_base=base, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} in config.json: megatron-core's multi-latent attention "
                         "has only the default and yarn RoPE")
    if params.get("truncate", True) is False:
        raise ValueError("rope_parameters truncate=false: megatron-core's YaRN always rounds the "
                         "correction range to integers")
    original = int(params["original_max_position_embeddings"])
    factor = float(params.get("factor") or hf_config.max_position_embeddings / original)
    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if all_dim and not mscale:
        raise ValueError("rope_parameters set mscale_all_dim without mscale: transformers then scales "
                         "cos/sin by YaRN's default factor, which megatron-core cannot combine with "
                         "mscale_all_dim")
    fields = dict(rope_type="yarn", rotary_base=base, rotary_scaling_factor=factor,
                  original_max_position_embeddings=original,
                  beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                  mscale=float(mscale) if mscale and all_dim else 1.0, mscale_all_dim=float(all_dim or 0.0))
    _, attention_factor = inv_freq_and_attention_factor(hf_config, hf_config.qk_rope_head_dim)
    concentration = (_yarn_mscale(factor, fields["mscale"]) / _yarn_mscale(factor, fields["mscale_all_dim"]))
    if not math.isclose(attention_factor, concentration, rel_tol=1e-6):
        raise ValueError(f"rope attention_factor {attention_factor} differs from megatron-core's YaRN "
                         f"concentration factor {concentration} for these mscale values")
    return fields
