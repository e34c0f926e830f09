"""One optimizer step and one evaluation pass, through megatron-core's pipeline schedules.

A training method is a loss and a batch shape: `forward_step` runs the model on a `TrainBatch`
and returns megatron's per-token losses with a loss function that sums them over the trained
tokens. With `calculate_per_token_loss` megatron divides gradients by the token count of the
whole global batch (all micro-batches, all data-parallel ranks).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaswift.data.collate import context_parallel_slice
from megaswift.runtime.distributed import device


def _loss_func(loss_mask: torch.Tensor, per_token_loss_scaling: bool, output: torch.Tensor):
    losses = output.float() * loss_mask
    loss = losses.sum()
    tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), tokens.detach().float()])
    if per_token_loss_scaling:  # megatron sums tokens over micro-batches and DP x CP ranks
        return loss, tokens, {"lm loss": report}
    if parallel_state.get_context_parallel_world_size() > 1:
        # this rank holds part of the micro-batch's tokens: divide by the whole micro-batch's
        # count (megatron multiplies by the CP size and DDP averages over DP x CP)
        tokens = tokens.clone()
        dist.all_reduce(tokens, group=parallel_state.get_context_parallel_group())
    return loss / tokens.clamp(min=1), {"lm loss": report}


def forward_step(data_iterator: Iterator, model, per_token: bool = True):
    """megatron's forward_step_func: (per-token losses, loss function).

    Every context-parallel rank reads the same micro-batch and keeps its load-balanced share.
    """
    batch = next(data_iterator).to(next(model.parameters()).device)
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        batch = context_parallel_slice(batch, cp, parallel_state.get_context_parallel_rank())
    output = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                   packed_seq_params=batch.packed_seq_params)
    return output, partial(_loss_func, batch.loss_mask, per_token)


def _reduce_losses(losses: list[dict]) -> tuple[float, float]:
    """(mean loss over trained tokens, trained tokens) of the global batch, on every rank."""
    total = torch.zeros(2, dtype=torch.float64, device=device())  # NCCL reduces device tensors only
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            total += item["lm loss"].double().to(total.device)
        if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # share the last stage's figure
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item(), total[1].item()


def _run_schedule(model: list, batches: list[Iterator], num_microbatches: int, config, forward_only: bool):
    fwd_bwd = get_forward_backward_func()
    iterators = batches if len(model) > 1 else batches[0]
    seq_length, mbs = getattr(config, "fixed_shape", None) or (1, 1)  # (1, 1): shapes exchanged
    return fwd_bwd(
        forward_step_func=partial(forward_step, per_token=config.calculate_per_token_loss),
        data_iterator=iterators,
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def train_step(model: list, optimizer, scheduler, batches: list[Iterator], num_microbatches: int, config) -> dict:
    """Forward+backward over the micro-batches, then the optimizer and LR step."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(model, batches, num_microbatches, config, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    loss, tokens = _reduce_losses(losses)
    return {"loss": loss, "trained_tokens": tokens, "grad_norm": float(grad_norm or 0.0),
            "lr": optimizer.param_groups[0]["lr"], "skipped": not ok}


@torch.no_grad()
def eval_step(model: list, batches: list[Iterator], num_microbatches: int, config) -> float:
    for chunk in model:
        chunk.eval()
    try:
        losses = _run_schedule(model, batches, num_microbatches, config, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    return _reduce_losses(losses)[0]
