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

from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megaswift.batch import TrainBatch
from megaswift.context_parallel import round_up, sample_multiple
from megaswift.data.template import IGNORE_INDEX

__all__ = ["TrainBatch", "split_samples", "shift_labels", "collate_padding_free", "collate_padded"]


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


def _cumsum(lengths: Sequence[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return cu


def collate_padding_free(samples: Sequence[dict], *, pad_id: int, multiple: int, cp: int = 1,
                         length: Optional[int] = None) -> TrainBatch:
    """All samples in one THD row ``[1, T]``: positions restart per sample, ``cu_seqlens``
    marks the samples, and padding up to the next multiple of ``multiple`` (or up to ``length``
    exactly, for fixed shapes) forms its own last segment (so ``cu_seqlens[-1] == T``, as
    megatron's THD RoPE splits by it) with loss_mask 0.

    Context parallel (``cp > 1``) splits every sample into ``2 * cp`` chunks, so each sample is
    first padded (at its end, loss_mask 0) to a multiple of ``2 * cp``: ``cu_seqlens_q_padded``
    holds those bounds, ``cu_seqlens_q`` the real ones (TransformerEngine's convention).
    Causal attention keeps the padding invisible to the sample's real tokens.
    """
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    if cp > 1 and multiple % (2 * cp):
        raise ValueError(f"pad multiple {multiple} must be a multiple of 2 x cp = {2 * cp}")
    parts = split_samples(samples)
    lengths = [len(ids) for ids, _ in parts]
    padded = [round_up(n, sample_multiple(cp)) for n in lengths]
    real = sum(lengths)
    total = round_up(sum(padded), multiple)
    if length is not None:
        if sum(padded) > length or length % multiple:
            raise ValueError(f"a micro-batch of {sum(padded)} tokens does not fit the fixed length {length} "
                             f"(a multiple of {multiple} is required)")
        total = length
    tail = total - sum(padded)
    ids, shifted, positions = [], [], []
    for (x, lab), n in zip(parts, padded):
        extra = n - len(x)
        ids += list(x) + [pad_id] * extra
        shifted += shift_labels(lab) + [IGNORE_INDEX] * extra
        positions += range(n)
    ids += [pad_id] * tail
    shifted += [IGNORE_INDEX] * tail
    positions += range(tail)
    segments = padded + ([tail] if tail else [])
    cu = _cumsum(segments)
    padded_cu = cu if cp > 1 else None
    real_cu = _cumsum(lengths + ([tail] if tail else [])) if cp > 1 else cu
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real_cu, cu_seqlens_kv=real_cu,
                             cu_seqlens_q_padded=padded_cu, cu_seqlens_kv_padded=padded_cu,
                             max_seqlen_q=max(segments), max_seqlen_kv=max(segments))
    labels, loss_mask = _targets_and_mask(torch.tensor([shifted], dtype=torch.long))
    return TrainBatch(input_ids=torch.tensor([ids], dtype=torch.long), labels=labels,
                      loss_mask=loss_mask, position_ids=torch.tensor([positions], dtype=torch.long),
                      attention_mask=None, packed_seq_params=params,
                      num_real_tokens=real, num_padded_tokens=total - real)


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
    s = round_up(max(len(ids) for ids, _ in parts), multiple)
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
