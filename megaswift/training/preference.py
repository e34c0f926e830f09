"""Direct preference optimisation as a training method (`megatron rlhf --rlhf_type dpo`).

A micro-batch holds whole preference pairs: chosen and rejected of each pair are consecutive
sequences of one padding-free THD row (or rows of a padded batch), so one forward gives both
log-probabilities. The loss is TRL's (`preference_loss.py`) on per-sequence log-probabilities:

* the policy's come from megatron's per-token cross entropy (``-loss`` summed over a sequence's
  trained tokens); under context parallel every rank holds part of each sequence, so the partial
  sums are all-reduced over the CP group (identity backward: each rank's gradient flows through
  its own tokens, and DDP sums the ranks);
* the reference's come from a forward-only pass of the reference model over the same
  micro-batches before the step (`prepare`), through megatron's own pipeline schedule, and ride on
  the batches to the last stage. The reference is a frozen copy of the starting weights (full
  training) or, for LoRA, the policy itself with its adapters off.

Figures are sums and counts reduced over micro-batches and data-parallel ranks (`metric_sums`), so
the logged means are the global batch's, whatever the layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.context_parallel import slice_batch
from megaswift.data.collate import collate_preference, collate_preference_padded, sequence_sums
from megaswift.model.forward import moe_padding_mask
from megaswift.training.method import Loss, Totals, ratio
from megaswift.training.preference_loss import (METRIC_NAMES, BCOPairState, PreferenceLossConfig, dpo_loss,
                                                metric_sums)


class _SumOverCP(torch.autograd.Function):
    """All-reduce (sum) over the context-parallel group; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=parallel_state.get_context_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


@dataclass
class DirectPreference:
    """DPO on pairs (see the module docstring). ``reference`` runs the reference model: a callable
    ``(batches per chunk, num_microbatches, config, shape) -> list of per-micro-batch log-probs``."""
    cfg: PreferenceLossConfig
    pad_id: int
    padding_free: bool = True
    multiple: int = 1
    cp: int = 1
    length: Optional[int] = None
    reference: Optional[Callable] = None
    bco: Optional[BCOPairState] = None
    reports: tuple = field(init=False)

    def __post_init__(self):
        names = [n for n in METRIC_NAMES if n != "nll_loss" or self.cfg.needs_nll]
        self.reports = tuple(names)
        if "bco_pair" in self.cfg.loss_types and self.bco is None:
            self.bco = BCOPairState()

    # -- batches -----------------------------------------------------------------------------
    def collate(self, samples: Sequence[dict]):
        if self.padding_free:
            return collate_preference(samples, pad_id=self.pad_id, multiple=self.multiple, cp=self.cp,
                                      length=self.length)
        return collate_preference_padded(samples, pad_id=self.pad_id, multiple=self.length or self.multiple)

    def _sequence_logps(self, per_token_loss: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs, trained tokens) per sequence, over the whole sequence under CP."""
        cp_rank = parallel_state.get_context_parallel_rank() if self.cp > 1 else 0
        logps = -sequence_sums(per_token_loss, batch, cp_size=self.cp, cp_rank=cp_rank)
        tokens = sequence_sums(torch.ones_like(per_token_loss, dtype=torch.float32), batch,
                               cp_size=self.cp, cp_rank=cp_rank)
        if self.cp > 1:
            logps = _SumOverCP.apply(logps)
            dist.all_reduce(tokens, group=parallel_state.get_context_parallel_group())
        return logps, tokens

    def _per_sequence(self, logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return logps / tokens.clamp(min=1) if self.cfg.mean_logps else logps

    # -- the reference pass --------------------------------------------------------------------
    def prepare(self, batches: list[list], num_microbatches: int, config, shape) -> None:
        """Attach the reference model's per-sequence log-probs to every micro-batch (last stage)."""
        if self.reference is None:
            return
        logps = self.reference(batches, num_microbatches, config, shape)
        for chunk_batches in batches:
            for b, ref in zip(chunk_batches, logps):
                b.ref_logps = ref

    def reference_forward(self, model, batch):
        """The forward-only counterpart used on the reference model: reports its log-probs."""
        if self.cp > 1:
            batch = slice_batch(batch, self.cp, parallel_state.get_context_parallel_rank())
        output = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                       packed_seq_params=batch.packed_seq_params,
                       padding_mask=moe_padding_mask(model, batch))

        def loss_func(per_token_loss):
            logps, tokens = self._sequence_logps(per_token_loss, batch)
            seq = self._per_sequence(logps, tokens).detach()
            return Loss(per_token_loss.new_zeros(()), torch.ones((), dtype=torch.int), {"ref_logps": seq})

        return output, loss_func

    # -- training ------------------------------------------------------------------------------
    def forward(self, model, batch):
        ref = getattr(batch, "ref_logps", None)
        if self.cp > 1:
            batch = slice_batch(batch, self.cp, parallel_state.get_context_parallel_rank())
        output = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                       packed_seq_params=batch.packed_seq_params,
                       padding_mask=moe_padding_mask(model, batch))
        return output, lambda per_token_loss: self.loss(per_token_loss, batch, ref)

    def loss(self, per_token_loss: torch.Tensor, batch, ref: Optional[torch.Tensor]) -> Loss:
        logps, tokens = self._sequence_logps(per_token_loss, batch)
        if ref is None:
            raise RuntimeError("no reference log-probs on this micro-batch (the reference pass did not run)")
        ref = ref.to(logps.device)
        # pairs with a trained token on both sides (a data-parallel rank short of rows gets an empty one)
        keep = ((tokens[0::2] > 0) & (tokens[1::2] > 0)).repeat_interleave(2)
        if not bool(keep.any()):
            zero = per_token_loss.sum() * 0.0  # keeps the graph: every rank runs backward
            reports = {k: torch.zeros(2, device=zero.device) for k in self.reports}
            return Loss(zero, torch.zeros((), dtype=torch.int), reports)
        logps, tokens, ref = logps[keep], tokens[keep], ref[keep]
        seq = self._per_sequence(logps, tokens)
        pc, pr = seq[0::2], seq[1::2]
        rc, rr = ref[0::2], ref[1::2]
        nll_sum, nll_count = -logps[0::2].sum(), tokens[0::2].sum()
        nll = nll_sum / nll_count.clamp(min=1) if self.cfg.needs_nll else None
        losses, chosen_r, rejected_r = dpo_loss(self.cfg, pc, pr, rc, rr, state=self.bco, nll_loss=nll,
                                                all_reduce=_sum_over_dp)
        sums = metric_sums(self.cfg, losses, chosen_r, rejected_r, pc, pr, nll_sum, nll_count)
        reports = {k: torch.stack([sums[k][0].float(), sums[k][1].float().to(sums[k][0].device)])
                   for k in self.reports}
        # every CP rank holds the whole loss, but only its tokens' share of the gradient: megatron
        # scales by 1/CP for the per-token average it expects, which this undoes
        return Loss(losses.sum() * self.cp, torch.tensor(losses.numel(), dtype=torch.int), reports)

    def summarise(self, totals: Totals) -> dict[str, float]:
        return {k: ratio(totals[k]) if totals[k][1] else 0.0 for k in self.reports} | {
            "pairs": totals["loss"][1] / max(self.cp, 1)}

    def summarise_eval(self, totals: Totals) -> dict[str, float]:
        return {k: ratio(totals[k]) if totals[k][1] else 0.0 for k in self.reports}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"bco_pair": self.bco.state_dict()} if self.bco is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.bco is not None and state.get("bco_pair"):
            self.bco.load_state_dict(state["bco_pair"])


def _sum_over_dp(x: torch.Tensor) -> torch.Tensor:
    """bco_pair's running mean sees every data-parallel rank's rewards (TRL gathers them)."""
    if parallel_state.get_data_parallel_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    return x


@contextlib.contextmanager
def _eval_mode(chunks):
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, m in zip(chunks, modes):
            c.train(m)


def reference_runner(method: DirectPreference, chunks: list, context=contextlib.nullcontext):
    """The `reference` callable of :class:`DirectPreference`: a forward-only pass of ``chunks`` (the
    reference model's, or the policy's inside ``context``, e.g. LoRA's `adapters_off`) through
    megatron's pipeline schedule; returns the per-micro-batch reference log-probs (last stage; an
    empty list elsewhere)."""
    from megaswift.training.step import run_schedule

    class _Ref:
        reports = ("ref_logps",)
        forward = staticmethod(method.reference_forward)

    def run(batches: list[list], num_microbatches: int, config, shape) -> list:
        with torch.no_grad(), context(chunks), _eval_mode(chunks):
            out = run_schedule(chunks, [iter(b) for b in batches], num_microbatches, config, _Ref, shape,
                               forward_only=True)
        return [o["ref_logps"] for o in out]

    return run
