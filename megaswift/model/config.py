"""The one translation from an HF `config.json` to megatron-core's `TransformerConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megaswift.model.rope import yarn_scaling_factor
from megaswift.runtime.context import current as current_runtime


@dataclass
class YarnTransformerConfig(TransformerConfig):
    """A TransformerConfig that declares YaRN's scaling factor: megatron-core's attention scales
    softmax by YaRN's concentration factor when its config has this field (as MLATransformerConfig)."""
    yarn_rotary_scaling_factor: float = 1.0

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def sliding_window(hf_config) -> int | None:
    """The attention window config.json switches on (Mistral-7B-v0.1, Qwen2 with
    `use_sliding_window`), or None."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    return int(window)


def check_sliding_window(hf_config, sequence_budget: int | None) -> None:
    """Refuse a run whose sequences could exceed the model's attention window.

    The core attention kernels are full causal; within the window that is the same attention,
    beyond it the model would silently train with attention it never had.
    """
    window = sliding_window(hf_config)
    if window is None or (sequence_budget is not None and sequence_budget <= window):
        return
    got = f"--max_length/--packing_length {sequence_budget}" if sequence_budget else "no --max_length"
    raise ValueError(f"config.json sets sliding_window {window} and {got} lets sequences exceed it: "
                     "megaswift's attention kernels do not implement sliding-window attention yet; "
                     f"pass --max_length {window} or less (attention within the window is exact)")


def model_fields(hf_config, family, moe=None) -> dict[str, Any]:
    """The family's TransformerConfig fields from config.json, with the MoE flags (`MoEArgs`) over them."""
    from megaswift.args.moe import MoEArgs

    fields = family.config_fields(hf_config)
    return {**fields, **(moe or MoEArgs()).config_fields(fields)}


def check_layout(parallel, hf_config, family, moe=None, *, training: bool) -> None:
    """Every check of the parallel layout against the model, before any work (LayoutError names the flag)."""
    parallel.validate_model(num_layers=hf_config.num_hidden_layers,
                            num_attention_heads=hf_config.num_attention_heads,
                            num_query_groups=num_kv_heads(hf_config))
    fields = model_fields(hf_config, family, moe)
    parallel.validate_experts(num_experts=fields.get("num_moe_experts") or 0, topk=fields.get("moe_router_topk"),
                              moe_ffn_hidden_size=fields.get("moe_ffn_hidden_size"), training=training)


@dataclass(frozen=True)
class ParallelSizes:
    """The parallel layout as megatron-core's config takes it (`ParallelArgs.sizes()` from flags)."""
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    ep: int = 1
    etp: int | None = None       # None: the same as tp
    sp: bool = False
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def group_sizes(self) -> dict:
        """The sizes under megatron-core's names, as both `TransformerConfig` and
        `parallel_state.initialize_model_parallel` take them."""
        return dict(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                    virtual_pipeline_model_parallel_size=self.vpp, context_parallel_size=self.cp,
                    expert_model_parallel_size=self.ep, expert_tensor_parallel_size=self.etp)


def transformer_config(hf_config, family, sizes: ParallelSizes, params_dtype: torch.dtype,
                       **overrides: Any) -> TransformerConfig:
    """Build the TransformerConfig for `hf_config` (of `family`) at layout `sizes`.

    The family's own fields (`Family.config_fields`) go over the shared ones; `overrides` carries
    training settings (recompute, dropout ...) that are not in the HF config and go over both.
    The layout is checked against the model before (`ParallelArgs.validate_model`).
    """
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} in config.json is not supported; "
                         f"supported: {sorted(_ACTIVATIONS)}")
    runtime = current_runtime()
    cuda = runtime.cuda
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=num_kv_heads(hf_config),
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=_ACTIVATIONS[act],
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        attention_softmax_in_fp32=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not cuda,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        **sizes.group_sizes(),
        sequence_parallel=sizes.sp,
        num_layers_in_first_pipeline_stage=sizes.first_stage_layers,
        num_layers_in_last_pipeline_stage=sizes.last_stage_layers,
    )
    if runtime.transformer_impl == "transformer_engine":  # TE's attention honours the backend itself
        from megatron.core.transformer.enums import AttnBackend

        kwargs["attention_backend"] = AttnBackend[runtime.attention_backend]
    kwargs.update(family.config_fields(hf_config))
    kwargs.update(overrides)
    if kwargs.get("multi_latent_attention"):  # MLA's own RoPE fields come with the family's (rope.mla_rope_fields)
        from megatron.core.transformer import MLATransformerConfig

        return MLATransformerConfig(**kwargs)
    yarn = yarn_scaling_factor(hf_config, kwargs["kv_channels"])
    if yarn is not None:
        return YarnTransformerConfig(yarn_rotary_scaling_factor=yarn, **kwargs)
    return TransformerConfig(**kwargs)


def _rope_theta(hf_config) -> float | None:
    theta = getattr(hf_config, "rope_theta", None)
    params = getattr(hf_config, "rope_parameters", None) or {}
    return theta if theta is not None else params.get("rope_theta")


def _rope_scaling(hf_config) -> dict | None:
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling is None:
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        params.pop("rope_theta", None)
        scaling = params if params.get("rope_type", "default") != "default" else None
    return dict(scaling) if scaling else None


def check_arch(arch, config, hf_config, padded_vocab_size: int) -> None:
    """The model-section flags (`ArchArgs`) describe the checkpoint: config.json is the truth, and a
    flag given with another value is an error naming both (a silently different model would
    load the checkpoint's weights into the wrong shapes, or train another architecture)."""
    import json
    import math

    actual = {
        "num_layers": config.num_layers, "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size, "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups,
        "group_query_attention": config.num_query_groups < config.num_attention_heads,
        "max_position_embeddings": getattr(hf_config, "max_position_embeddings", None),
        "position_embedding_type": "rope", "rotary_base": _rope_theta(hf_config),
        "rotary_percent": float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0),
        "normalization": config.normalization, "norm_epsilon": config.layernorm_epsilon,
        "swiglu": bool(config.gated_linear_unit), "untie_embeddings_and_output_weights":
            not getattr(hf_config, "tie_word_embeddings", False),
        "disable_bias_linear": not config.add_bias_linear, "add_qkv_bias": bool(config.add_qkv_bias),
        "kv_channels": config.kv_channels, "qk_layernorm": bool(config.qk_layernorm),
        "padded_vocab_size": padded_vocab_size,
    }
    for name, want in actual.items():
        given = getattr(arch, name)
        if given is None or want is None:
            continue
        same = math.isclose(float(given), float(want), rel_tol=1e-9) if isinstance(want, float) else given == want
        if not same:
            show = lambda v: f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
            raise ValueError(f"--{name} {show(given)} contradicts the checkpoint, whose config.json gives {show(want)}: "
                             f"drop --{name} (the model section is read from config.json)")
    if arch.rope_scaling is not None:
        given, have = json.loads(arch.rope_scaling), _rope_scaling(hf_config) or {}
        differ = {k: (v, have.get(k)) for k, v in given.items() if have.get(k) != v}
        if differ:
            shown = ", ".join(f"{k}: {g!r} vs {h!r}" for k, (g, h) in differ.items())
            raise ValueError(f"--rope_scaling contradicts config.json's rope_scaling ({shown}, flag vs config.json): "
                             "drop --rope_scaling or edit config.json")
