"""Training methods: what one micro-batch is, what the model computes on it, and how it is scored.

The loop, megatron's pipeline schedules, the optimizer and checkpointing are the same for every
method; a method supplies the rest:

* ``reports``: the names of the figures each micro-batch's loss reports;
* ``collate(samples)``: a micro-batch from tokenised rows (what the data pipeline produced);
* ``forward(model, batch)``: runs this rank's model chunk and returns megatron's
  ``(output, loss_func)``; ``loss_func(output)`` returns a :class:`Loss`;
* ``summarise(totals)`` / ``summarise_eval(totals)``: the logged figures of a global batch from
  the reports summed over its micro-batches and data-parallel (x context-parallel) ranks.

:class:`LanguageModeling` (``megatron pt`` / ``megatron sft``: next-token cross entropy over the
trained tokens) is the first; preference training is another instance with its own batch and loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from megatron.core import parallel_state

from megaswift.batch import TrainBatch
from megaswift.context_parallel import slice_batch
from megaswift.data.collate import collate_padded, collate_padding_free
from megaswift.model.forward import moe_padding_mask


@dataclass
class Loss:
    """What a method's loss function returns for one micro-batch on this rank.

    ``loss`` is a *sum* over the micro-batch's units (tokens, pairs ...), ``units`` how many it
    holds: megatron divides gradients by the units of the whole global batch
    (``calculate_per_token_loss``), or the step divides per micro-batch. ``reports`` maps each
    logged figure to ``[numerator, denominator]``; both are summed over micro-batches and
    data-parallel ranks, and a figure is their ratio.
    """
    loss: torch.Tensor
    units: torch.Tensor
    reports: dict[str, torch.Tensor]


Totals = dict[str, tuple[float, float]]


class TrainingMethod(Protocol):
    reports: tuple[str, ...]  # the names of the reports every loss_func returns

    def collate(self, samples: Sequence[dict]): ...

    def forward(self, model, batch) -> tuple[torch.Tensor, Callable[[torch.Tensor], Loss]]: ...

    def summarise(self, totals: Totals) -> dict[str, float]: ...

    def summarise_eval(self, totals: Totals) -> dict[str, float]: ...


def ratio(pair: tuple[float, float]) -> float:
    return pair[0] / max(pair[1], 1)


@dataclass(frozen=True)
class LanguageModeling:
    """Next-token cross entropy summed over the trained tokens (``loss_mask``).

    ``padding_free``: samples (and packed rows) go into one THD row with ``cu_seqlens``; else
    right-padded ``[b, s]`` with a causal mask. ``multiple`` is what the sequence dim is padded
    to (TP with sequence parallel, context parallel); ``length`` pads every micro-batch to one
    fixed length (interleaved pipeline schedules). Context-parallel ranks read the same
    micro-batch and each keeps its load-balanced share.
    """
    pad_id: int
    padding_free: bool = True
    multiple: int = 1
    cp: int = 1
    length: Optional[int] = None
    reports = ("loss",)

    def collate(self, samples: Sequence[dict]) -> TrainBatch:
        if self.padding_free:
            return collate_padding_free(samples, pad_id=self.pad_id, multiple=self.multiple, cp=self.cp,
                                        length=self.length)
        return collate_padded(samples, pad_id=self.pad_id, multiple=self.length or self.multiple)

    def forward(self, model, batch: TrainBatch):
        if self.cp > 1:
            batch = slice_batch(batch, self.cp, parallel_state.get_context_parallel_rank())
        output = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                       packed_seq_params=batch.packed_seq_params,
                       padding_mask=moe_padding_mask(model, batch))
        return output, lambda per_token: self.loss(batch.loss_mask, per_token)

    @staticmethod
    def loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> Loss:
        total = (per_token_loss.float() * loss_mask).sum()
        tokens = loss_mask.sum()
        return Loss(total, tokens, {"loss": torch.stack([total.detach(), tokens.detach()])})

    def summarise(self, totals: Totals) -> dict[str, float]:
        return {"loss": ratio(totals["loss"]), "trained_tokens": totals["loss"][1]}

    def summarise_eval(self, totals: Totals) -> dict[str, float]:
        loss = ratio(totals["loss"])
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}
