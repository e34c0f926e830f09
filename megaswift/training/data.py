"""Deterministic micro-batches for each data-parallel rank, resumable from any iteration.

Samples are visited in a seeded permutation per epoch. Optimizer step `i` takes the global batch
stream[i*G:(i+1)*G] (crossing epoch boundaries as needed); data-parallel rank r takes its
contiguous share and cuts it into micro-batches. The position in the data is therefore a pure
function of the iteration, which is what makes `--load` resume at exactly the next batch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import numpy as np


class GlobalBatchSampler:
    """Sample indices of each optimizer step, for one data-parallel rank."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"--global_batch_size {global_batch_size} is not a multiple of "
                             f"--micro_batch_size {micro_batch_size} x data-parallel size {dp_size}")
        if num_samples == 0:
            raise ValueError("the training dataset is empty")
        self.n, self.g, self.mbs = num_samples, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_microbatches(self) -> int:
        return self.g // (self.mbs * self.dp_size)

    def iterations_per_epoch(self) -> int:
        return max(1, self.n // self.g)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng(self.seed + epoch)
            self._perms = {epoch: rng.permutation(self.n) if self.shuffle else np.arange(self.n)}
        return self._perms[epoch]

    def global_batch(self, iteration: int) -> list[int]:
        start = iteration * self.g
        out = []
        for pos in range(start, start + self.g):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def micro_batches(self, iteration: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for optimizer step `iteration`."""
        share = self.g // self.dp_size
        mine = self.global_batch(iteration)[self.dp_rank * share:(self.dp_rank + 1) * share]
        return [mine[i:i + self.mbs] for i in range(0, share, self.mbs)]


def micro_batch_iterator(dataset, sampler: GlobalBatchSampler, iteration: int,
                         collate: Callable[[list[dict]], object]) -> Iterator:
    """The micro-batches of one optimizer step, collated."""
    for indices in sampler.micro_batches(iteration):
        samples = [s for s in (dataset[i] for i in indices) if s is not None]
        yield collate(samples)


def train_iters_for_epochs(num_samples: int, global_batch_size: int, epochs: int) -> int:
    return max(1, math.ceil(num_samples * epochs / global_batch_size))


def eval_batches(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, limit: Optional[int]):
    """Fixed validation micro-batches for this rank (the first `limit` per rank)."""
    usable = len(dataset) // dp_size * dp_size  # every rank runs the same number of batches
    per_rank = list(range(dp_rank, usable, dp_size))
    batches = [per_rank[i:i + micro_batch_size] for i in range(0, len(per_rank), micro_batch_size)]
    return batches[:limit] if limit else batches
