"""The micro-batch megatron-core's GPTModel consumes: what data produces and model and training read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class TrainBatch:
    """One micro-batch as the GPTModel consumes it.

    ``labels`` are next-token targets (already shifted, ignored positions set to 0),
    ``loss_mask`` is 1.0 where a target is trained. Padding-free batches have ``b == 1``,
    ``attention_mask`` None and ``packed_seq_params`` (THD); padded batches the reverse.
    ``num_real_tokens`` counts the samples' tokens, ``num_padded_tokens`` the padding tokens
    added on top (so ``num_real_tokens + num_padded_tokens == b * s``).
    """
    input_ids: torch.Tensor                      # [b, s] long
    labels: torch.Tensor                         # [b, s] long
    loss_mask: torch.Tensor                      # [b, s] float
    position_ids: torch.Tensor                   # [b, s] long
    attention_mask: Optional[torch.Tensor]       # bool [b, 1, s, s], True = masked out
    packed_seq_params: Optional[PackedSeqParams]
    num_real_tokens: int
    num_padded_tokens: int
    padding_mask: Optional[torch.Tensor] = None  # bool [b, s], True = a padding token (MoE routers skip them)

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch, padding included (``b * s``)."""
        return self.input_ids.numel()

    def to(self, device) -> "TrainBatch":
        """A copy with every tensor on ``device`` (cu_seqlens stay int32)."""
        p = self.packed_seq_params
        if p is not None:
            move = lambda x: x.to(device) if x is not None else None  # noqa: E731
            p = dataclasses.replace(p, cu_seqlens_q=move(p.cu_seqlens_q), cu_seqlens_kv=move(p.cu_seqlens_kv),
                                    cu_seqlens_q_padded=move(p.cu_seqlens_q_padded),
                                    cu_seqlens_kv_padded=move(p.cu_seqlens_kv_padded))
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        pad = self.padding_mask.to(device) if self.padding_mask is not None else None
        return TrainBatch(self.input_ids.to(device), self.labels.to(device),
                          self.loss_mask.to(device), self.position_ids.to(device), mask, p,
                          self.num_real_tokens, self.num_padded_tokens, pad)
