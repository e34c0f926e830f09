"""How a full MCore tensor is cut over tensor-parallel ranks and put back together.

Kept apart from the format transforms in `mappings.py`: a mapping says *which* split applies to
its parameter, this module is the only place that knows what each split means.
"""

from __future__ import annotations

from enum import Enum

import torch


class Shard(Enum):
    REPLICATED = "replicated"  # every TP rank holds the whole tensor (norms, row-parallel bias)
    COLUMN = "column"          # split along dim 0 (column-parallel weight/bias, vocab rows)
    ROW = "row"                # split along dim 1 (row-parallel weight)
    GLU = "glu"                # [gate; up] along dim 0, each half split, rank r holds [gate_r; up_r]


def shard(full: torch.Tensor, kind: Shard, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s piece of `full` out of `size` TP ranks."""
    if size == 1 or kind is Shard.REPLICATED:
        return full
    if kind is Shard.COLUMN:
        return _split(full, 0, size)[rank]
    if kind is Shard.ROW:
        return _split(full, 1, size)[rank]
    if kind is Shard.GLU:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([_split(gate, 0, size)[rank], _split(up, 0, size)[rank]])
    raise ValueError(kind)


def unshard(parts: list[torch.Tensor], kind: Shard) -> torch.Tensor:
    """The full tensor from the pieces of every TP rank, in rank order."""
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


def _split(t: torch.Tensor, dim: int, size: int) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over "
                         f"--tensor_model_parallel_size {size}")
    return t.chunk(size, dim=dim)
