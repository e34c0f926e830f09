"""Deterministic micro-batches for each data-parallel rank, resumable from any iteration.

Samples are visited in a seeded permutation per epoch (in order with `--train_dataloader_shuffle
false`). Optimizer step `i` takes the global batch stream[i*G:(i+1)*G] (crossing epoch
boundaries as needed); data-parallel rank r takes its contiguous share and cuts it into
micro-batches. The position in the data is therefore a pure function of the iteration, which is
what makes `--load` resume at exactly the next batch.

Streams (`--streaming true`, `StreamBatches`) follow the same rule on the stream's own order:
step `i` takes stream samples [i*G, (i+1)*G), counted over passes (epochs) of the stream, and
rank r its contiguous share. Every rank reads (and tokenises) the whole stream: the stream is
deterministic for a seed, so all ranks agree on every global batch, on the rows dropped while
tokenising and on where a pass ends, without any communication. Resuming at iteration k reads
and discards the first k*G samples. `--max_epochs N` ends training when the N-th pass cannot
fill a global batch (that partial batch is not trained on).

`--lazy_tokenize true` rows are tokenised on access; a row dropped then (too long, nothing to
train) is left out of its micro-batch, which is therefore shorter. With per-token loss (the
default `--calculate_per_token_loss true`) the loss is still the mean over the global batch's
trained tokens; a micro-batch left empty becomes one fully masked token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from megaswift.data.template import IGNORE_INDEX

# Stands in for a micro-batch whose every row was dropped on access: no loss, no trained token.
EMPTY_SAMPLE = {"input_ids": [0], "labels": [IGNORE_INDEX]}


@dataclass
class StepData:
    """The samples one rank trains on in one optimizer step."""
    micro_batches: list[list[dict]]
    global_tokens: Optional[int]  # real tokens of the whole global batch, when every rank knows them

    @property
    def local_tokens(self) -> int:
        return sum(len(s["input_ids"]) for mb in self.micro_batches for s in mb)

    def collated(self, collate: Callable[[list[dict]], object]) -> Iterator:
        """The micro-batches collated one at a time (a fresh iterator per model chunk)."""
        for mb in self.micro_batches:
            yield collate(mb or [EMPTY_SAMPLE])


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


class IndexedBatches:
    """Steps of a map-style dataset (tokenised ahead, or `LazyTokenized`) through a sampler."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, lengths: Optional[Sequence[int]]):
        self.dataset, self.sampler, self.lengths = dataset, sampler, lengths

    @property
    def num_microbatches(self) -> int:
        return self.sampler.num_microbatches

    def step(self, iteration: int) -> StepData:
        mbs = [[s for s in (self.dataset[i] for i in idx) if s is not None]
               for idx in self.sampler.micro_batches(iteration)]
        tokens = None
        if self.lengths is not None:
            tokens = sum(self.lengths[i] for i in self.sampler.global_batch(iteration))
        return StepData(mbs, tokens)


class StreamBatches:
    """Steps cut from a stream, in order (see the module docstring).

    ``stream`` is re-iterated for every pass; ``set_epoch(e)`` is called on it first when it has
    one (datasets' shuffle buffer is then re-seeded per pass). ``step(i)`` returns None once
    ``max_epochs`` passes cannot fill global batch ``i``.
    """

    def __init__(self, stream: Iterable[dict], global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, max_epochs: Optional[int] = None):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"--global_batch_size {global_batch_size} is not a multiple of "
                             f"--micro_batch_size {micro_batch_size} x data-parallel size {dp_size}")
        self.stream, self.g, self.mbs = stream, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.max_epochs = dp_rank, dp_size, max_epochs
        self.epoch = 0  # passes started
        self._samples: Optional[Iterator[dict]] = None
        self._next = -1  # the iteration the reader is positioned at

    @property
    def num_microbatches(self) -> int:
        return self.g // (self.mbs * self.dp_size)

    def _read(self) -> Iterator[dict]:
        self.epoch = 0
        while self.max_epochs is None or self.epoch < self.max_epochs:
            if hasattr(self.stream, "set_epoch"):
                self.stream.set_epoch(self.epoch)
            self.epoch += 1
            empty = True
            for sample in self.stream:
                empty = False
                yield sample
            if empty:
                raise ValueError("the training stream has no usable rows")

    def step(self, iteration: int) -> Optional[StepData]:
        if iteration != self._next:  # (re)position: skip the samples of the steps before
            self._samples = self._read()
            skip = iteration * self.g
            if skip and next(islice(self._samples, skip - 1, skip), None) is None:
                self._next = iteration + 1
                return None
        batch = list(islice(self._samples, self.g))
        self._next = iteration + 1
        if len(batch) < self.g:
            return None
        share = self.g // self.dp_size
        mine = batch[self.dp_rank * share:(self.dp_rank + 1) * share]
        return StepData([mine[i:i + self.mbs] for i in range(0, share, self.mbs)],
                        sum(len(s["input_ids"]) for s in batch))


def train_iters_for_epochs(num_samples: int, global_batch_size: int, epochs: int) -> int:
    return max(1, math.ceil(num_samples * epochs / global_batch_size))


def eval_batches(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, limit: Optional[int]):
    """Fixed validation micro-batches for this rank (the first `limit` per rank)."""
    usable = len(dataset) // dp_size * dp_size  # every rank runs the same number of batches
    per_rank = list(range(dp_rank, usable, dp_size))
    batches = [per_rank[i:i + micro_batch_size] for i in range(0, len(per_rank), micro_batch_size)]
    return batches[:limit] if limit and limit > 0 else batches   # -1: the whole validation set
