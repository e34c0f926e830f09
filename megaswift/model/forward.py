"""Forward passes outside the training schedule: full-vocab logits across TP and PP ranks.

Used by the conversion precision check and by evaluation-style callers. Pipeline stages pass the
hidden states along with plain point-to-point sends; the last stage all-gathers the vocab-parallel
logits over TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


@dataclass
class Batch:
    """Model inputs: padded ([b, s] + attention mask) or packed THD ([1, t] + cu_seqlens)."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None   # bool [b, 1, s, s], True = masked out
    packed_seq_params: Optional[PackedSeqParams] = None


def padded_batch(samples: list[list[int]], pad_id: int = 0) -> tuple[Batch, torch.Tensor]:
    """Right-padded batch and its [b, s] validity mask."""
    s = max(len(x) for x in samples)
    ids = torch.full((len(samples), s), pad_id, dtype=torch.long)
    valid = torch.zeros(len(samples), s, dtype=torch.bool)
    for i, x in enumerate(samples):
        ids[i, : len(x)] = torch.tensor(x)
        valid[i, : len(x)] = True
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    mask = ~(causal[None, None] & valid[:, None, None, :])
    pos = torch.arange(s).expand(len(samples), s).contiguous()
    return Batch(ids, pos, mask), valid


def packed_batch(samples: list[list[int]]) -> Batch:
    """All samples concatenated into one THD row, positions restarting per sample."""
    lens = [len(x) for x in samples]
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    ids = torch.tensor([t for x in samples for t in x])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    return Batch(ids, pos, None, params)


def _to(batch: Batch, device: torch.device) -> Batch:
    p = batch.packed_seq_params
    if p is not None:
        p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=p.cu_seqlens_q.to(device),
                            cu_seqlens_kv=p.cu_seqlens_kv.to(device),
                            max_seqlen_q=p.max_seqlen_q, max_seqlen_kv=p.max_seqlen_kv)
    mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
    return Batch(batch.input_ids.to(device), batch.position_ids.to(device), mask, p)


@torch.no_grad()
def forward_logits(model, batch: Batch, config) -> Optional[torch.Tensor]:
    """Full-vocab logits [b, s, V_padded] on the last pipeline stage, None elsewhere.

    `model` is this rank's single chunk (no virtual pipeline). Every rank of the model-parallel
    group must call it.
    """
    device = next(model.parameters()).device
    batch = _to(batch, device)
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
