"""One optimizer step and one evaluation pass, through megatron-core's pipeline schedules.

Method-agnostic: the :class:`~megaswift.training.method.TrainingMethod` supplies the forward pass
and the loss of a micro-batch; this module hands them to megatron's schedule, normalises the loss
the way megatron expects, and reduces the method's reports over micro-batches, data-parallel and
pipeline ranks. With ``calculate_per_token_loss`` megatron divides gradients by the units
(tokens, pairs ...) of the whole global batch (all micro-batches, all data-parallel ranks).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaswift.runtime.distributed import device
from megaswift.training.method import Loss, Totals, TrainingMethod


def _megatron_loss(loss_func, per_token: bool, output: torch.Tensor):
    """The method's :class:`Loss` in the form megatron's schedule consumes."""
    out: Loss = loss_func(output)
    units = out.units.detach().to(torch.int)
    if per_token:  # megatron sums the units over micro-batches and DP x CP ranks
        return out.loss, units, out.reports
    if parallel_state.get_context_parallel_world_size() > 1:
        # this rank holds part of the micro-batch: divide by the whole micro-batch's units
        # (megatron multiplies by the CP size and DDP averages over DP x CP)
        units = units.clone()
        dist.all_reduce(units, group=parallel_state.get_context_parallel_group())
    return out.loss / units.clamp(min=1), out.reports


def forward_step(data_iterator: Iterator, model, method: TrainingMethod, per_token: bool = True):
    """megatron's forward_step_func: (output, loss function) of the next micro-batch."""
    batch = next(data_iterator)
    moved = batch.to(next(model.parameters()).device)
    for k, v in vars(batch).items():  # what a method's `prepare` attached (DPO's reference log-probs)
        if k not in vars(moved):
            setattr(moved, k, v)
    batch = moved
    output, loss_func = method.forward(model, batch)
    return output, partial(_megatron_loss, loss_func, per_token)


def reduce_reports(losses: list[dict], names: tuple[str, ...]) -> Totals:
    """Each report's ``(numerator, denominator)`` summed over the global batch, on every rank."""
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=device())  # NCCL reduces device tensors only
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            total += torch.stack([item[k].double().to(total.device) for k in names])
        if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # share the last stage's figures
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return {k: (total[i, 0].item(), total[i, 1].item()) for i, k in enumerate(names)}


def run_schedule(model: list, batches: list[Iterator], num_microbatches: int, config, method: TrainingMethod,
                  shape: Optional[tuple[int, int]], forward_only: bool):
    fwd_bwd = get_forward_backward_func()
    iterators = batches if len(model) > 1 else batches[0]
    seq_length, mbs = shape or (1, 1)  # (1, 1): shapes are exchanged per micro-batch
    return fwd_bwd(
        forward_step_func=partial(forward_step, method=method, per_token=config.calculate_per_token_loss),
        data_iterator=iterators,
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def train_step(model: list, optimizer, scheduler, batches: list[Iterator], num_microbatches: int, config,
               method: TrainingMethod, shape: Optional[tuple[int, int]] = None) -> dict:
    """Forward+backward over the micro-batches, then the optimizer and LR step.

    ``shape``: (seq_length, micro_batch_size) when every micro-batch has that one shape
    (interleaved pipelines); None exchanges shapes between stages per micro-batch.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, batches, num_microbatches, config, method, shape, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {**method.summarise(reduce_reports(losses, method.reports)), "grad_norm": float(grad_norm or 0.0),
            "lr": optimizer.param_groups[0]["lr"], "skipped": not ok}


@torch.no_grad()
def eval_step(model: list, batches: list[Iterator], num_microbatches: int, config, method: TrainingMethod,
              shape: Optional[tuple[int, int]] = None) -> dict:
    for chunk in model:
        chunk.eval()
    try:
        losses = run_schedule(model, batches, num_microbatches, config, method, shape, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    return method.summarise_eval(reduce_reports(losses, method.reports))
