"""Forward passes outside the training schedule: full-vocab logits across TP and PP ranks.

Used by the conversion precision check and by evaluation-style callers. Pipeline stages pass the
hidden states along with plain point-to-point sends; the last stage all-gathers the vocab-parallel
logits over TP.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megaswift.batch import TrainBatch


def moe_padding_mask(model, batch: TrainBatch) -> Optional[torch.Tensor]:
    """The batch's padding tokens as this stage's MoE routers take them (they route no padding, so
    router losses, expert load and capacity see only real tokens), or None for a dense model."""
    inner = model
    while hasattr(inner, "module"):  # DDP, Float16Module
        inner = inner.module
    if not inner.config.num_moe_experts or batch.padding_mask is None:
        return None
    mask = batch.padding_mask
    if not inner.pre_process and inner.config.sequence_parallel:
        # megatron-core scatters the mask over sequence-parallel ranks on the first stage only
        tp = parallel_state.get_tensor_model_parallel_world_size()
        mask = mask.chunk(tp, dim=1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()
    return mask


@torch.no_grad()
def forward_logits(model, batch: TrainBatch, config) -> Optional[torch.Tensor]:
    """Full-vocab logits [b, s, V_padded] on the last pipeline stage, None elsewhere.

    `model` is this rank's single chunk (no virtual pipeline). Every rank of the model-parallel
    group must call it.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    if pp > 1 and not first:
        b, s = batch.input_ids.shape
        if config.sequence_parallel:
            s //= parallel_state.get_tensor_model_parallel_world_size()
        dtype = next(model.parameters()).dtype
        recv = torch.empty(s, b, config.hidden_size, dtype=dtype, device=device)
        dist.recv(recv, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(recv)
    out = model(batch.input_ids, batch.position_ids, batch.attention_mask,
                packed_seq_params=batch.packed_seq_params)
    if pp > 1 and not last:
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)
