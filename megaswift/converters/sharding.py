"""How a full MCore tensor is cut over parallel ranks and put back together.

Kept apart from the format transforms in `mappings.py`: a mapping says *which* split applies to
its parameter and over which group (`Axis`); this module is the only place that knows what each
split means, where a rank sits on each group (`Placement`), and which experts an expert-parallel
rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Shard(Enum):
    REPLICATED = "replicated"  # every rank of the group holds the whole tensor (norms, router)
    COLUMN = "column"          # split along dim 0 (column-parallel weight/bias, vocab rows)
    ROW = "row"                # split along dim 1 (row-parallel weight)
    GLU = "glu"                # [gate; up] along dim 0, each half split, rank r holds [gate_r; up_r]


class Axis(Enum):
    """The process group a parameter is split over (the value is the flag that sizes it)."""
    TP = "--tensor_model_parallel_size"            # dense layers, router, shared experts
    EXPERT_TP = "--expert_tensor_parallel_size"    # the routed experts' own weights


@dataclass(frozen=True)
class Placement:
    """This rank's (rank, size) on each axis a weight can be split over, and on expert parallel.

    Expert parallel does not split a tensor: it decides which experts a rank holds. Megatron gives
    EP rank r the `n_local` consecutive experts from r * n_local.
    """
    tp: tuple[int, int] = (0, 1)
    etp: tuple[int, int] = (0, 1)
    ep: tuple[int, int] = (0, 1)

    def on(self, axis: Axis) -> tuple[int, int]:
        """(rank, size) of the group that `axis` names."""
        return self.tp if axis is Axis.TP else self.etp

    def global_expert(self, local: int, num_experts: int) -> int:
        """The model-wide index of this rank's `local`-th expert (of `num_experts` in all)."""
        rank, size = self.ep
        if num_experts % size:
            raise ValueError(f"--expert_model_parallel_size {size} does not divide the model's "
                             f"{num_experts} experts; use a divisor of {num_experts}")
        return rank * (num_experts // size) + local


def expert_owner(expert: int, num_experts: int, ep_size: int) -> tuple[int, int]:
    """(EP rank, local index) that holds global expert `expert`: the inverse of `global_expert`."""
    return divmod(expert, num_experts // ep_size)


def shard(full: torch.Tensor, kind: Shard, rank: int, size: int, axis: Axis = Axis.TP) -> torch.Tensor:
    """Rank `rank`'s piece of `full` out of the `size` ranks of `axis`."""
    if size == 1 or kind is Shard.REPLICATED:
        return full
    if kind is Shard.COLUMN:
        return _split(full, 0, size, axis)[rank]
    if kind is Shard.ROW:
        return _split(full, 1, size, axis)[rank]
    if kind is Shard.GLU:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([_split(gate, 0, size, axis)[rank], _split(up, 0, size, axis)[rank]])
    raise ValueError(kind)


def unshard(parts: list[torch.Tensor], kind: Shard) -> torch.Tensor:
    """The full tensor from the pieces of every rank of the group, in rank order."""
    if len(parts) == 1 or kind is Shard.REPLICATED:
        return parts[0]
    if kind is Shard.COLUMN:
        return torch.cat(parts, dim=0)
    if kind is Shard.ROW:
        return torch.cat(parts, dim=1)
    if kind is Shard.GLU:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(kind)


def _split(t: torch.Tensor, dim: int, size: int, axis: Axis) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over "
                         f"{axis.value} {size}")
    return t.chunk(size, dim=dim)
