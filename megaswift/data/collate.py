"""Micro-batches for megatron-core's GPTModel: padding-free (THD) or right-padded.

Samples arrive tokenised as ``{"input_ids": [...], "labels": [...]}`` with HF-style labels:
aligned with ``input_ids``, unshifted, ``-100`` where a token is not trained. Packed rows also
carry ``"lengths"`` (the boundaries of the samples concatenated in the row); each such
sub-sample is treated exactly like a separate sample.

megatron computes the loss at position ``t`` against ``labels[t]``, so the shift happens here:
per sample, ``target[t] = labels[t + 1]`` and the sample's last position gets ``-100`` (a sample
never predicts the first token of the next one). In a :class:`TrainBatch`, ``labels`` holds the
shifted targets with ``-100`` replaced by 0 (megatron's cross entropy indexes the vocabulary
with them) and ``loss_mask`` is 1.0 exactly where the shifted target was not ``-100``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "TrainBatch", "pad_multiple", "split_samples", "shift_labels",
           "collate_padding_free", "collate_padded"]


def pad_multiple(tp: int, sequence_parallel: bool, cp: int) -> int:
    """The multiple a micro-batch's token count (sequence dim) must be padded to.

    Sequence parallel splits the sequence over the ``tp`` ranks; context parallel splits it into
    ``2 * cp`` chunks (load-balanced causal halves). Both: their lcm. Neither: 1.
    """
    m = 1
    if sequence_parallel and tp > 1:
        m = math.lcm(m, tp)
    if cp > 1:
        m = math.lcm(m, 2 * cp)
    return m


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch, padding included (``b * s``)."""
        return self.input_ids.numel()

    def to(self, device) -> "TrainBatch":
        """A copy with every tensor on ``device`` (cu_seqlens stay int32)."""
        p = self.packed_seq_params
        if p is not None:
            p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=p.cu_seqlens_q.to(device),
                                cu_seqlens_kv=p.cu_seqlens_kv.to(device),
                                max_seqlen_q=p.max_seqlen_q, max_seqlen_kv=p.max_seqlen_kv)
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return TrainBatch(self.input_ids.to(device), self.labels.to(device),
                          self.loss_mask.to(device), self.position_ids.to(device), mask, p,
                          self.num_real_tokens, self.num_padded_tokens)


def split_samples(samples: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per sample, packed rows expanded into their sub-samples."""
    out = []
    for i, row in enumerate(samples):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if len(ids) != len(labels):
            raise ValueError(f"sample {i}: {len(ids)} input_ids but {len(labels)} labels")
        lengths = row.get("lengths") or [len(ids)]
        if sum(lengths) != len(ids) or any(n <= 0 for n in lengths):
            raise ValueError(f"sample {i}: lengths {list(lengths)} must be positive and sum to "
                             f"its {len(ids)} tokens")
        start = 0
        for n in lengths:
            out.append((ids[start:start + n], labels[start:start + n]))
            start += n
    if not out:
        raise ValueError("cannot collate an empty micro-batch")
    return out


def shift_labels(labels: Sequence[int]) -> list[int]:
    """Next-token targets of one sample: ``labels[1:] + [-100]``."""
    return list(labels[1:]) + [IGNORE_INDEX]


def _targets_and_mask(shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    trained = shifted != IGNORE_INDEX
    return torch.where(trained, shifted, torch.zeros_like(shifted)), trained.float()


def collate_padding_free(samples: Sequence[dict], *, pad_id: int, multiple: int) -> TrainBatch:
    """All samples in one THD row ``[1, T]``: positions restart per sample, ``cu_seqlens``
    marks the samples, and padding up to the next multiple of ``multiple`` forms its own last
    segment (so ``cu_seqlens[-1] == T``, as megatron's THD RoPE splits by it) with loss_mask 0.
    """
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    parts = split_samples(samples)
    lengths = [len(ids) for ids, _ in parts]
    real = sum(lengths)
    pad = _round_up(real, multiple) - real
    ids = [t for x, _ in parts for t in x] + [pad_id] * pad
    shifted = [t for _, lab in parts for t in shift_labels(lab)] + [IGNORE_INDEX] * pad
    segments = lengths + ([pad] if pad else [])
    positions = [p for n in segments for p in range(n)]

    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int32), 0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(segments), max_seqlen_kv=max(segments))
    labels, loss_mask = _targets_and_mask(torch.tensor([shifted], dtype=torch.long))
    return TrainBatch(input_ids=torch.tensor([ids], dtype=torch.long), labels=labels,
                      loss_mask=loss_mask, position_ids=torch.tensor([positions], dtype=torch.long),
                      attention_mask=None, packed_seq_params=params,
                      num_real_tokens=real, num_padded_tokens=pad)


def collate_padded(samples: Sequence[dict], *, pad_id: int, multiple: int) -> TrainBatch:
    """Right-padded ``[b, s]`` batch, ``s`` = longest sample rounded up to ``multiple``.

    ``attention_mask`` is ``~(causal & key_is_real)``, bool ``[b, 1, s, s]``. Packed rows (with
    ``lengths``) are refused: they need cu_seqlens, i.e. ``--padding_free true``.
    """
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    for i, row in enumerate(samples):
        if len(row.get("lengths") or ()) > 1:
            raise ValueError(f"sample {i} is a packed row ({len(row['lengths'])} samples): "
                             "packing needs --padding_free true")
    parts = split_samples(samples)
    b = len(parts)
    s = _round_up(max(len(ids) for ids, _ in parts), multiple)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    shifted = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros(b, s, dtype=torch.bool)
    for i, (x, lab) in enumerate(parts):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        shifted[i, :len(x)] = torch.tensor(shift_labels(lab), dtype=torch.long)
        real[i, :len(x)] = True
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    mask = ~(causal[None, None] & real[:, None, None, :])
    labels, loss_mask = _targets_and_mask(shifted)
    n_real = int(real.sum())
    return TrainBatch(input_ids=ids, labels=labels, loss_mask=loss_mask,
                      position_ids=torch.arange(s).expand(b, s).contiguous(),
                      attention_mask=mask, packed_seq_params=None,
                      num_real_tokens=n_real, num_padded_tokens=b * s - n_real)
