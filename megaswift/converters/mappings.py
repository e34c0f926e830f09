"""Typed HF <-> MCore weight mappings, each declared once and used in both directions.

A mapping names one megatron-core parameter (with `*` for the global layer index and `{E}` for
the global expert index, see `names.py`) and the HF tensor(s) it is made of, and says how the full
MCore tensor is split (`shard`) over which group (`axis`: tensor parallel, or expert-tensor
parallel for routed experts). It transforms *full* tensors only; cutting them into pieces is
`sharding.py`'s job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from megaswift.converters.names import fill
from megaswift.converters.sharding import Axis, Shard


@dataclass(frozen=True)
class ModelDims:
    """The few model numbers the format transforms need."""
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


@dataclass(frozen=True)
class Mapping(ABC):
    mcore: str
    shard: Shard = Shard.REPLICATED
    axis: Axis = Axis.TP
    roles: ClassVar[tuple[str, ...]] = ("hf",)
    # The transforms only regroup, split or trim dim 0 (a weight's output features) and carry the
    # other dims along, so they apply to any tensor with the weight's rows: a bias, LoRA's B.
    # A mapping that also changes dim 1 must say False (its LoRA then has no PEFT form).
    row_wise: ClassVar[bool] = True
    # Kept in float32 whatever dtype the model is written in (DeepSeek-V3's routing bias is fp32
    # inside bf16 checkpoints, as megatron keeps its expert bias).
    keeps_float32: ClassVar[bool] = False

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> dict[str, str]:
        """{role: HF tensor name} for the global `layer` and `expert` (None where not indexed)."""
        return {role: fill(getattr(self, role), layer, expert) for role in self.roles}

    @abstractmethod
    def to_mcore(self, hf: dict[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        """The full MCore tensor from its HF tensors (by role)."""

    @abstractmethod
    def to_hf(self, t: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
        """The HF tensors (by role) from the full MCore tensor."""


@dataclass(frozen=True)
class Rename(Mapping):
    """The same tensor under another name."""
    hf: str = ""

    def to_mcore(self, hf, dims):
        return hf["hf"]

    def to_hf(self, t, dims):
        return {"hf": t}


@dataclass(frozen=True)
class Float32Rename(Rename):
    """A renamed tensor that stays float32 in a lower-precision checkpoint."""
    keeps_float32: ClassVar[bool] = True


@dataclass(frozen=True)
class VocabRows(Mapping):
    """Embedding / output rows: padded with zero rows to the padded vocab size, trimmed on export."""
    hf: str = ""
    shard: Shard = Shard.COLUMN

    def to_mcore(self, hf, dims):
        t = hf["hf"]
        if t.shape[0] != dims.vocab_size:
            raise ValueError(f"{self.hf} has {t.shape[0]} rows, config.json vocab_size is "
                             f"{dims.vocab_size}")
        pad = dims.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

    def to_hf(self, t, dims):
        return {"hf": t[: dims.vocab_size]}


@dataclass(frozen=True)
class QKV(Mapping):
    """Fused QKV: megatron interleaves per query group, [g0: q.. k v | g1: q.. k v | ...].

    Works for weights ([heads*d, hidden]) and biases ([heads*d]) alike, so TP can split the fused
    tensor into contiguous groups.
    """
    q: str = ""
    k: str = ""
    v: str = ""
    shard: Shard = Shard.COLUMN
    roles: ClassVar[tuple[str, ...]] = ("q", "k", "v")

    def to_mcore(self, hf, dims):
        g, d = dims.num_query_groups, dims.head_dim
        per = dims.num_attention_heads // g
        q = hf["q"].reshape(g, per * d, *hf["q"].shape[1:])
        k = hf["k"].reshape(g, d, *hf["k"].shape[1:])
        v = hf["v"].reshape(g, d, *hf["v"].shape[1:])
        return torch.cat([q, k, v], dim=1).reshape(-1, *hf["q"].shape[1:])

    def to_hf(self, t, dims):
        g, d = dims.num_query_groups, dims.head_dim
        per = dims.num_attention_heads // g
        grouped = t.reshape(g, (per + 2) * d, *t.shape[1:])
        q, k, v = grouped.split([per * d, d, d], dim=1)
        flat = lambda x: x.reshape(-1, *t.shape[1:]).contiguous()
        return {"q": flat(q), "k": flat(k), "v": flat(v)}


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """SwiGLU fc1: megatron's full tensor is [gate; up]; TP splits each half (Shard.GLU)."""
    gate: str = ""
    up: str = ""
    shard: Shard = Shard.GLU
    roles: ClassVar[tuple[str, ...]] = ("gate", "up")

    def to_mcore(self, hf, dims):
        return torch.cat([hf["gate"], hf["up"]], dim=0)

    def to_hf(self, t, dims):
        gate, up = t.chunk(2, dim=0)
        return {"gate": gate.contiguous(), "up": up.contiguous()}
