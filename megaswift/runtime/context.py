"""The one runtime decision: device, backend, transformer implementation and attention kernel.

Resolved once at start from the flags (`--transformer_impl`, `--attention_backend`) and the
hardware, logged once, and read by every module that must choose (layer spec, model placement,
collectives, RNG state, core attention). Nothing else consults `torch.cuda.is_available()`.

Options that only change speed fall back to the portable path with one logged line where the
hardware or kernels are missing; the environment variables `MEGASWIFT_TRANSFORMER_IMPL` and
`MEGASWIFT_ATTENTION` remain as overrides for debugging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TRANSFORMER_IMPLS = ("local", "transformer_engine")
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
#: what the local (non-TE) core attention runs for each --attention_backend
_LOCAL_KERNEL = {"flash": "fused", "fused": "fused", "auto": "fused", "unfused": "reference", "local": "reference"}


@dataclass(frozen=True)
class Runtime:
    device_type: str          # "cuda" or "cpu"
    backend: str              # torch.distributed backend: "nccl" or "gloo"
    transformer_impl: str     # what is used: "transformer_engine" or "local"
    attention_backend: str    # as requested (megatron's AttnBackend name, for the TE path)
    attention_kernel: str     # the local path's core attention: "fused" (SDPA) or "reference"
    notes: tuple[str, ...] = ()  # the fallbacks taken, one line each

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"

    def device(self) -> torch.device:
        """The device this rank computes on (and collectives run on)."""
        if self.cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(transformer_impl: str = "transformer_engine", attention_backend: str = "flash") -> Runtime:
    """The runtime for these flags on this machine (no side effects)."""
    transformer_impl = os.environ.get("MEGASWIFT_TRANSFORMER_IMPL") or transformer_impl
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer_impl {transformer_impl!r}: use one of {', '.join(TRANSFORMER_IMPLS)}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention_backend {attention_backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    cuda = torch.cuda.is_available()
    notes = []
    impl = transformer_impl
    if impl == "transformer_engine" and not (cuda and _transformer_engine_importable()):
        missing = "CUDA" if not cuda else "the transformer-engine package (pip install 'megaswift[gpu]')"
        notes.append(f"--transformer_impl transformer_engine: no {missing}; using the local layer spec "
                     "(same parameter names and math)")
        impl = "local"
    kernel = os.environ.get("MEGASWIFT_ATTENTION") or _LOCAL_KERNEL[attention_backend]
    if kernel not in ("fused", "reference"):
        raise ValueError(f"MEGASWIFT_ATTENTION must be 'fused' or 'reference', got {kernel!r}")
    if impl == "local" and attention_backend in ("flash", "fused"):
        where = "torch SDPA" + (" (flash kernels where CUDA has them)" if cuda else " on the CPU")
        notes.append(f"--attention_backend {attention_backend}: needs TransformerEngine; using {where} "
                     "(same math)")
    return Runtime(device_type="cuda" if cuda else "cpu", backend="nccl" if cuda else "gloo",
                   transformer_impl=impl, attention_backend=attention_backend, attention_kernel=kernel,
                   notes=tuple(notes))


_current: Runtime | None = None


def set_current(runtime: Runtime) -> Runtime:
    global _current
    _current = runtime
    return runtime


def current() -> Runtime:
    """The runtime resolved at start (the defaults' resolution before any command set one)."""
    global _current
    if _current is None:
        _current = resolve()
    return _current


def _deep_ep_importable() -> bool:
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


def moe_kernels(fields: dict, runtime: Runtime) -> tuple[dict, list[str]]:
    """The MoE speed options `fields` asks for, turned into their portable equivalents where this
    machine lacks them; returns (fields, one note per fallback). Results do not change."""
    fields, notes = dict(fields), []
    te = runtime.transformer_impl == "transformer_engine"
    if fields.get("moe_grouped_gemm") and not te:
        fields["moe_grouped_gemm"] = False
        notes.append("--moe_grouped_gemm true: needs TransformerEngine on CUDA; using SequentialMLP "
                     "(one GEMM per local expert, same math and checkpoint)")
    if fields.get("moe_permute_fusion") and not te:
        fields["moe_permute_fusion"] = False
        notes.append("--moe_permute_fusion true: needs TransformerEngine on CUDA; permuting tokens in torch")
    if fields.get("moe_token_dispatcher_type") == "flex" and not (runtime.cuda and _deep_ep_importable()):
        fields["moe_token_dispatcher_type"], fields["moe_enable_deepep"] = "alltoall", False
        notes.append("--moe_token_dispatcher_type flex: needs CUDA and the deep_ep package; using the "
                     "alltoall dispatcher")
    if fields.get("moe_shared_expert_overlap") and not (
            runtime.cuda and fields.get("moe_token_dispatcher_type") in ("alltoall", "flex")):
        fields["moe_shared_expert_overlap"] = False
        notes.append("--moe_shared_expert_overlap true: needs CUDA streams and the alltoall/flex "
                     "dispatcher; the shared expert runs after the routed ones")
    return fields, notes


def kernel_fusions(megatron, runtime: Runtime) -> tuple[dict, list[str]]:
    """megatron-core's fusion switches for the `--no_*_fusion` flags on this machine: on where CUDA
    (and for the kernels TransformerEngine brings, TE) are present, else the unfused torch ops with
    one note. Speed only: the math is the same either way."""
    te = runtime.transformer_impl == "transformer_engine"
    wanted = {  # TransformerConfig field: (asked for, available here)
        "bias_dropout_fusion": (not megatron.no_bias_dropout_fusion, runtime.cuda),
        "bias_activation_fusion": (not megatron.no_bias_swiglu_fusion, runtime.cuda),
        "masked_softmax_fusion": (not megatron.no_masked_softmax_fusion, te),
        "apply_rope_fusion": (not megatron.no_rope_fusion, te),
        "gradient_accumulation_fusion": (not megatron.no_gradient_accumulation_fusion, te),
    }
    fields = {k: asked and here for k, (asked, here) in wanted.items()}
    missing = [k for k, (asked, here) in wanted.items() if asked and not here]
    notes = []
    if missing:
        need = "CUDA" if not runtime.cuda else "TransformerEngine"
        notes.append(f"kernel fusions {', '.join(m.replace('_fusion', '').replace('apply_', '') for m in missing)}: "
                     f"need {need}; using the unfused torch ops (same math)")
    return fields, notes


_OPTIMIZER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}


def precision_aware_optimizer(megatron, runtime: Runtime) -> dict:
    """OptimizerConfig fields for --use_precision_aware_optimizer and its state dtypes. They change
    results, so where TransformerEngine's FusedAdam cannot run them they are refused, not dropped."""
    dtypes = {k: getattr(megatron, k) for k in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype",
                                                "exp_avg_sq_dtype")}
    if not megatron.use_precision_aware_optimizer:
        lowered = [f"--{k} {v}" for k, v in dtypes.items() if v != "fp32"]
        if lowered:
            raise ValueError(f"{' '.join(lowered)} needs --use_precision_aware_optimizer true")
        return {}
    if not (runtime.cuda and runtime.transformer_impl == "transformer_engine"):
        missing = "CUDA" if not runtime.cuda else "TransformerEngine"
        raise ValueError(f"--use_precision_aware_optimizer true needs {missing} (TransformerEngine's FusedAdam keeps "
                         "the lower-precision states); it changes results, so it is not dropped: remove the flag")
    return {"use_precision_aware_optimizer": True, **{k: _OPTIMIZER_DTYPES[v] for k, v in dtypes.items()}}
