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

Preference pairs (:mod:`megaswift.data.preference`) are batched by :func:`collate_preference`
(padding-free) and :func:`collate_preference_padded`: every pair becomes two sequences, chosen
then rejected, in pair order, and :func:`sequence_sums` adds per-token values up per sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megaswift.batch import TrainBatch
from megaswift.context_parallel import load_balanced_indices, round_up, sample_multiple
from megaswift.data.template import IGNORE_INDEX

__all__ = ["TrainBatch", "split_samples", "shift_labels", "collate_padding_free", "collate_padded",
           "PreferenceBatch", "EMPTY_PAIR", "pair_sequences", "collate_preference", "collate_preference_padded",
           "sequence_index", "sequence_sums"]


def split_samples(samples: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per sample, packed rows expanded into their sub-samples."""
    out = []
    for i, row in enumerate(samples):
        if row.get("pairs") is not None or ("input_ids" not in row and "chosen_input_ids" in row):
            raise ValueError(f"sample {i} holds preference pairs: batch it with collate_preference")
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
    ids, shifted, positions, is_pad = [], [], [], []
    for (x, lab), n in zip(parts, padded):
        extra = n - len(x)
        ids += list(x) + [pad_id] * extra
        shifted += shift_labels(lab) + [IGNORE_INDEX] * extra
        positions += range(n)
        is_pad += [False] * len(x) + [True] * extra
    ids += [pad_id] * tail
    shifted += [IGNORE_INDEX] * tail
    positions += range(tail)
    is_pad += [True] * tail
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
                      num_real_tokens=real, num_padded_tokens=total - real,
                      padding_mask=torch.tensor([is_pad], dtype=torch.bool))


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
                      num_real_tokens=n_real, num_padded_tokens=b * s - n_real, padding_mask=~real)


# ---------------------------------------------------------------------------- preference pairs

# A pair with nothing to train (one pad token per side), for a rank whose micro-batch is empty.
EMPTY_PAIR = {"chosen_input_ids": [0], "chosen_labels": [IGNORE_INDEX],
              "rejected_input_ids": [0], "rejected_labels": [IGNORE_INDEX], "length": 2}


@dataclass
class PreferenceBatch(TrainBatch):
    """A :class:`TrainBatch` of ``num_pairs`` preference pairs: ``2 * num_pairs`` sequences in the
    order chosen_0, rejected_0, chosen_1, rejected_1, ... (THD segments, or rows when padded)."""
    num_pairs: int = 0

    def to(self, device) -> "PreferenceBatch":
        moved = super().to(device)
        return PreferenceBatch(**{f.name: getattr(moved, f.name) for f in dataclasses.fields(TrainBatch)},
                               num_pairs=self.num_pairs)


def pair_sequences(samples: Sequence[dict]) -> tuple[list[dict], int]:
    """(sequences as plain samples, number of pairs) of preference rows, in pair order.

    A pair row (``chosen_input_ids``/``chosen_labels``/``rejected_input_ids``/``rejected_labels``)
    gives two samples, chosen then rejected; a packed row (``input_ids``/``labels``/``lengths``
    and ``pairs``) stays one sample whose ``lengths`` already list chosen, rejected, chosen, ...
    A plain sample without a trained token (``training.batches.EMPTY_SAMPLE``, which stands in for
    an empty micro-batch) counts as :data:`EMPTY_PAIR`: one pair with no trained token, which a
    loss must leave out (its per-sequence token counts are 0).
    """
    seqs: list[dict] = []
    pairs = 0
    for i, row in enumerate(samples):
        if (row.get("chosen_input_ids") is None and row.get("pairs") is None and row.get("lengths") is None
                and all(t == IGNORE_INDEX for t in row.get("labels") or [0])):
            row = EMPTY_PAIR  # a plain sample with nothing to train: the trainer's empty micro-batch stand-in
        if row.get("chosen_input_ids") is not None:
            for side in ("chosen", "rejected"):
                ids, labels = row.get(f"{side}_input_ids"), row.get(f"{side}_labels")
                if ids is None or labels is None:
                    raise ValueError(f"sample {i}: a preference pair needs {side}_input_ids and {side}_labels")
                seqs.append({"input_ids": ids, "labels": labels})
            pairs += 1
        elif row.get("pairs") is not None:
            lengths = list(row.get("lengths") or ())
            if row["pairs"] < 1 or len(lengths) != 2 * row["pairs"]:
                raise ValueError(f"sample {i}: a packed row of {row['pairs']} pairs needs 2 lengths per pair, "
                                 f"got {len(lengths)}")
            seqs.append({"input_ids": row["input_ids"], "labels": row["labels"], "lengths": lengths})
            pairs += row["pairs"]
        else:
            raise ValueError(f"sample {i} is not a preference pair (no chosen_input_ids, not a packed row of "
                             f"pairs; columns {sorted(row)}): build the data with build_preference_datasets")
    if not pairs:
        raise ValueError("cannot collate an empty micro-batch")
    return seqs, pairs


def _preference_batch(batch: TrainBatch, pairs: int) -> PreferenceBatch:
    return PreferenceBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(TrainBatch)},
                           num_pairs=pairs)


def collate_preference(samples: Sequence[dict], *, pad_id: int, multiple: int, cp: int = 1,
                       length: Optional[int] = None) -> PreferenceBatch:
    """Preference pairs (pair rows and/or packed rows of pairs) in one THD row, padding-free.

    The sequences are laid out as :func:`collate_padding_free` lays out samples, in the order
    chosen_0, rejected_0, chosen_1, rejected_1, ... (a packed row contributes its pairs in its
    order); ``num_pairs`` says how many pairs. Sequence ``k`` (``2 i``: pair ``i``'s chosen,
    ``2 i + 1``: its rejected) occupies the positions ``cu[k] <= t < cu[k + 1]`` of the row, with
    ``cu = packed_seq_params.cu_seqlens_q_padded`` when it is set (``cp > 1``: each sequence is
    padded at its end to a multiple of ``2 * cp``) and ``cu = packed_seq_params.cu_seqlens_q``
    otherwise (``cp == 1``: the two are the same bounds). Do not take the bounds from
    ``cu_seqlens_q`` when ``cp > 1``: it holds the real lengths, not positions. A segment
    ``2 * num_pairs``, when present, is the batch's tail padding.

    Labels are already shifted inside each sequence: at position ``t``, ``labels[t]`` is the token
    at ``t + 1`` of the same sequence and ``loss_mask[t]`` is 1.0 when that token is trained (the
    sequence's last position and its padding are 0). So with megatron's per-token loss
    ``-log p(labels[t] | tokens <= t)``, a sequence's log-probability of its trained tokens is
    ``-sum(per_token_loss * loss_mask)`` over its positions: :func:`sequence_sums` does that sum.
    """
    seqs, pairs = pair_sequences(samples)
    return _preference_batch(collate_padding_free(seqs, pad_id=pad_id, multiple=multiple, cp=cp, length=length),
                             pairs)


def collate_preference_padded(samples: Sequence[dict], *, pad_id: int, multiple: int) -> PreferenceBatch:
    """Preference pairs right-padded (``--padding_free false``): batch rows chosen_0, rejected_0,
    chosen_1, ... as :func:`collate_padded` makes them (``[2 * num_pairs, s]``, labels shifted per
    row). Packed rows need ``--padding_free true``."""
    seqs, pairs = pair_sequences(samples)
    return _preference_batch(collate_padded(seqs, pad_id=pad_id, multiple=multiple), pairs)


def sequence_index(batch: PreferenceBatch) -> torch.Tensor:
    """Which sequence each position of the (whole, not CP-sliced) micro-batch belongs to, shaped
    like ``input_ids``: ``0 .. 2 * num_pairs - 1`` (even: chosen, odd: rejected), ``-1`` for the
    THD tail padding. Padded batches: row ``i`` is sequence ``i``."""
    p = batch.packed_seq_params
    n = 2 * batch.num_pairs
    if p is None:
        b, s = batch.input_ids.shape
        return torch.arange(b, device=batch.input_ids.device)[:, None].expand(b, s)
    cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
    lens = (cu[1:] - cu[:-1]).long()
    idx = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    return torch.where(idx < n, idx, torch.full_like(idx, -1))[None]


def sequence_sums(values: torch.Tensor, batch: PreferenceBatch, *, cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """``values * loss_mask`` summed per sequence: a float32 tensor ``[2 * num_pairs]`` in the order
    chosen_0, rejected_0, chosen_1, ... (``out[0::2]`` chosen, ``out[1::2]`` rejected). Differentiable
    in ``values``.

    ``values`` is a per-position tensor shaped like ``batch.loss_mask`` (e.g. megatron's per-token
    loss, so ``-sequence_sums(loss, batch)`` are the sequences' log-probabilities). Under context
    parallel pass the rank's sliced batch (``context_parallel.slice_batch``) with ``cp_size`` and
    ``cp_rank``: the sums are then this rank's share, to be all-reduced over the context-parallel group.
    """
    masked = values.float() * batch.loss_mask
    n = 2 * batch.num_pairs
    if batch.packed_seq_params is None:
        return masked.sum(dim=1)
    idx = sequence_index(batch).reshape(-1)
    if cp_size > 1:
        p = batch.packed_seq_params
        cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        idx = idx[load_balanced_indices((cu[1:] - cu[:-1]).tolist(), cp_size, cp_rank).to(idx.device)]
    masked = masked.reshape(-1)
    if idx.numel() != masked.numel():
        raise ValueError(f"values have {masked.numel()} positions, the batch's sequences {idx.numel()}: "
                         "pass the batch the values were computed on (sliced with cp_size/cp_rank under CP)")
    idx = torch.where(idx < 0, torch.full_like(idx, n), idx).to(masked.device)
    return masked.new_zeros(n + 1).index_add(0, idx, masked)[:n]
