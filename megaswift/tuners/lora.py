"""LoRA around megatron-core's tensor-parallel linears, by composition.

`LoraLinear` holds the original linear as `base_layer` (untouched, frozen) and adds
`lora_A` / `lora_B`, PEFT's names and arithmetic: ``y = base(x) + B(A(dropout(x))) * scale`` with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), A Kaiming-uniform and B zero at the start.

How the adapter is split follows the base, so no layer ever holds a full-size matrix it would not
hold anyway:

- column-parallel base (``linear_qkv``, ``linear_fc1``; weight split along its output): A is
  replicated, B is split along the output like the base. Without sequence parallel the input is
  replicated over TP, so A's output is too and only its gradient is summed over TP
  (`copy_to_tensor_model_parallel_region`). With sequence parallel the input is this rank's
  sequence chunk: A runs on the chunk and its rank-r output is all-gathered (8 / hidden of the
  traffic of gathering the input); A's gradient is then partial and reduced over TP like a norm's
  (``sequence_parallel`` attribute, megatron's `finalize_model_grads`).
- row-parallel base (``linear_proj``, ``linear_fc2``; weight split along its input): A is split
  along the input like the base and B is replicated. A's partial output is all-reduced (or
  reduce-scattered to sequence chunks under sequence parallel) before B.

Routed experts (megatron's `is_expert` linears of `SequentialMLP`, one adapter per local expert)
are split the same way but over the *expert* tensor-parallel group, with no communication in the
forward: the token dispatcher already hands every expert-TP rank the same tokens (gathered over
expert-TP) and sums the ranks' partial outputs when it combines them (a reduce-scatter), exactly as
it does for the base's own partial outputs. So a column expert computes ``B_r (A x)`` and a row
expert its partial ``B (A_r x_r)``; the replicated A (column) or B (row) then sees only this rank's
part of its gradient, which is summed over expert-TP in the backward (`_SumGradOver`). Adapter
weights copy the base weight's ``allreduce`` attribute (False under expert parallelism), so
megatron's DDP and optimizer treat them as expert parameters (reduced over expert-data-parallel).

Fused pre-norm linears (our `LayerNormColumnParallelLinear`, TE's `TELayerNormColumnParallelLinear`)
feed the adapter the *normalised* input, as the unfused HF model does for q/k/v_proj.

Parameter names stay canonical for the converter and the checkpoint: `sharded_state_dict` writes
the base's tensors under the base's own keys, so a base checkpoint loads into a LoRA model and a
LoRA run's checkpoint names its adapter tensors `<module>.lora_A.weight` / `.lora_B.weight`.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from megaswift.model.layers import LayerNormColumnParallelLinear
from megaswift.model.norm import rms_norm

COLUMN, ROW = "column", "row"


def parallel_mode(module: nn.Module) -> str | None:
    """'column' or 'row' for a megatron / TE tensor-parallel linear, else None."""
    if isinstance(module, ColumnParallelLinear):
        return COLUMN
    if isinstance(module, RowParallelLinear):
        return ROW
    mode = getattr(module, "parallel_mode", None)  # TE linears: TEColumnParallelLinear, TERowParallelLinear ...
    if type(module).__module__.startswith("megatron.core.extensions.transformer_engine") and mode in (COLUMN, ROW):
        return mode
    return None


def _sizes(base: nn.Module, mode: str) -> tuple[int, int]:
    """(full input features, full output features) of a megatron or TE parallel linear."""
    if hasattr(base, "input_size") and hasattr(base, "output_size"):  # megatron-core's own linears
        return int(base.input_size), int(base.output_size)
    tp = base.tp_size  # TE linears: the local weight (TE's in/out_features are per-partition too)
    out_local, in_local = base.weight.shape
    return (in_local * tp, out_local) if mode == ROW else (in_local, out_local * tp)


def _tp_group(base: nn.Module):
    group = getattr(base, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state
        group = parallel_state.get_tensor_model_parallel_group()
    return group


def seeded_kaiming_(weight_full: torch.Tensor, key: str, seed: int) -> torch.Tensor:
    """PEFT's A init (`kaiming_uniform_(a=sqrt(5))`) from a generator seeded by the module's global
    name, so every layout (and every TP rank holding a replica) starts from the same adapter."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    fan_in = weight_full.shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # gain(leaky_relu, a=sqrt(5)) = sqrt(1/3)
    with torch.no_grad():
        weight_full.copy_(torch.rand(weight_full.shape, generator=g, dtype=torch.float64)
                          .mul_(2 * bound).sub_(bound).to(weight_full.dtype))
    return weight_full


class _SumGradOver(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over `group` (a replicated weight whose
    every rank saw only part of the tokens' contribution)."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class LoraLinear(nn.Module):
    """A megatron/TE parallel linear plus a LoRA adapter (see the module docstring)."""

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float, use_rslora: bool,
                 key: str, seed: int):
        super().__init__()
        mode = parallel_mode(base)
        if mode is None:
            raise TypeError(f"{key}: LoRA wraps megatron-core/TE tensor-parallel linears, not {type(base).__name__}")
        if not isinstance(getattr(base, "weight", None), torch.Tensor):
            raise NotImplementedError(
                f"{key}: LoRA wraps linears with one weight; {type(base).__name__} (grouped experts) holds one "
                "per expert: train LoRA on MoE with --moe_grouped_gemm false (SequentialMLP experts)")
        self.is_expert = bool(getattr(base, "is_expert", False))
        self.base_layer = base
        self.mode, self.key = mode, key
        self.r, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.tp_group = _tp_group(base)
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
        # experts see dispatched tokens, never sequence chunks (see the module docstring)
        self.sequence_parallel = (bool(getattr(base, "sequence_parallel", False)) and self.tp_size > 1
                                  and not self.is_expert)
        in_full, out_full = _sizes(base, mode)
        dtype = base.weight.dtype
        device = base.weight.device
        a_full = seeded_kaiming_(torch.empty(rank, in_full, dtype=dtype), key, seed)
        if mode == COLUMN:
            a_local = a_full
            b_local = torch.zeros(out_full // self.tp_size, rank, dtype=dtype)
        else:
            a_local = a_full.chunk(self.tp_size, dim=1)[self.tp_rank].clone()
            b_local = torch.zeros(out_full, rank, dtype=dtype)
        self.lora_A = nn.Linear(a_local.shape[1], rank, bias=False, device="meta")
        self.lora_B = nn.Linear(rank, b_local.shape[0], bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(a_local.to(device))
        self.lora_B.weight = nn.Parameter(b_local.to(device))
        # What megatron needs to know about each adapter weight: the split one is TP-parallel
        # (counted once per shard in the grad norm); the replicated one gets its gradient summed
        # over TP when each rank saw only its sequence chunk.
        split, replicated = (self.lora_B.weight, self.lora_A.weight) if mode == COLUMN else (self.lora_A.weight, self.lora_B.weight)
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=0 if mode == COLUMN else 1, stride=1)
        setattr(replicated, "sequence_parallel", self.sequence_parallel)
        self.replicated_part = "A" if mode == COLUMN else "B"
        if self.is_expert:  # expert parameters for megatron's DDP and optimizer, as the base weight
            for p in (split, replicated):
                setattr(p, "allreduce", bool(getattr(base.weight, "allreduce", True)))
        for p in base.parameters():
            p.requires_grad_(False)
        self.disabled = False  # True: the base alone (a LoRA run's reference model, see `adapters_off`)

    def __getattr__(self, name: str):
        """Attributes megatron's modules read off their linear (`te_return_bias` ...) come from the base."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- forward -----------------------------------------------------------------------------
    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the base's matmul sees: the normalised input for fused pre-norm linears."""
        base = self.base_layer
        if isinstance(base, LayerNormColumnParallelLinear):
            return rms_norm(x, base.layer_norm_weight, base.eps)
        if hasattr(base, "layer_norm_weight"):  # TE's LayerNorm + linear
            config = base.config
            w = base.layer_norm_weight + (1 if getattr(config, "layernorm_zero_centered_gamma", False) else 0)
            if getattr(config, "normalization", "RMSNorm") == "RMSNorm":
                return rms_norm(x, w, config.layernorm_epsilon)
            return F.layer_norm(x, x.shape[-1:], w, getattr(base, "layer_norm_bias", None), config.layernorm_epsilon)
        return x

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return x
        if self.mode == ROW or self.sequence_parallel:  # each TP rank holds different elements
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)  # replicated input: the same mask on every TP rank

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.is_expert and self.tp_size > 1 and torch.is_grad_enabled():  # replicated: partial gradient
            if self.replicated_part == "A":
                a = _SumGradOver.apply(a, self.tp_group)
            else:
                b = _SumGradOver.apply(b, self.tp_group)
        return a, b

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the base's output (its local shard, as the base's; for an
        expert under expert-TP, a row-parallel one's partial sum as the base's)."""
        if self.is_expert:
            a, b = self._weights()
            return F.linear(F.linear(self._dropout(x), a), b) * self.scaling
        h = F.linear(self._dropout(x), self.lora_A.weight)
        if self.mode == COLUMN:
            if self.sequence_parallel:
                h = gather_from_sequence_parallel_region(h, group=self.tp_group)
            elif self.tp_size > 1:
                h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        elif self.tp_size > 1:
            h = (reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group) if self.sequence_parallel
                 else reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return F.linear(h, self.lora_B.weight) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out, bias
        return out + self.lora_delta(self._adapter_input(x)).to(out.dtype), bias

    # -- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of scale * B @ A, the shape of the base's local weight (fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the adapter into the base weight (in fp32, rounded once to its dtype)."""
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))

    # -- checkpoints ---------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's tensors under the base's own checkpoint keys (its state-dict keys gain
        `base_layer.`), plus the adapter split as described in the module docstring."""
        base = self.base_layer.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        out = {f"{prefix}base_layer.{k[len(prefix):]}": v for k, v in base.items()}
        own = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        axis = {"lora_B.weight": 0} if self.mode == COLUMN else {"lora_A.weight": 1}
        from megatron.core import parallel_state
        dp_cp = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
        # the base's own groups: an expert's adapter splits over expert-TP like the expert weight
        out.update(make_sharded_tensors_for_checkpoint(own, prefix, axis, sharded_offsets,
                                                       tp_group=self.tp_group, dp_cp_group=dp_cp))
        if self.mode == COLUMN and self.key.endswith("linear_fc1") and getattr(self.base_layer.config, "gated_linear_unit", False):
            # SwiGLU fc1 holds [gate_r; up_r] on TP rank r: saved as megatron saves the fc1 weight
            # itself ([gate; up] whatever the TP size), or a run resumed or exported at another TP
            # size would mix gate and up rows. (megatron's MLP only does this for `linear_fc1.weight`.)
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for k in (f"{prefix}base_layer.weight", f"{prefix}base_layer.bias", f"{prefix}lora_B.weight"):
                if k in out and isinstance(out[k], ShardedTensor):
                    out[k] = apply_swiglu_sharded_factory(out[k], sharded_offsets, singleton)
        return out

    def extra_repr(self) -> str:
        return f"{self.mode}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


@contextlib.contextmanager
def adapters_off(chunks):
    """The base model alone inside the block: every LoraLinear of `chunks` skips its adapter
    (what preference training uses as its reference model, with no second copy of the weights)."""
    layers = [m for c in chunks for m in c.modules() if isinstance(m, LoraLinear)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False
