"""Context parallelism in one place: the token layout, the padding it needs, and the K/V gather.

megatron-core's load-balanced layout: with ``cp`` context-parallel ranks every sequence is cut
into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``,
concatenated. Under causal attention the first chunk has the least work and the second the most,
so every rank does the same amount. Packed (THD) rows apply this per sample, so each sample is
padded to a multiple of ``2 * cp`` (``cu_seqlens_*_padded`` hold those bounds).

Used by the data side (how far to pad: :func:`pad_multiple`, :func:`padded_length`), by training
(which tokens a rank computes: :func:`slice_batch`) and by the attention kernels (every rank's
K/V in global order: :func:`gather_kv`; which keys a local query chunk sees:
:func:`query_chunks`). Pure torch: the kernels import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["round_up", "pad_multiple", "sample_multiple", "padded_length", "load_balanced_indices",
           "slice_batch", "gather_kv", "query_chunks"]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sample_multiple(cp: int) -> int:
    """What each sample of a packed row is padded to under context parallel: ``2 * cp`` (1 without)."""
    return 2 * cp if cp > 1 else 1


def pad_multiple(tp: int, sequence_parallel: bool, cp: int) -> int:
    """The multiple a micro-batch's token count (sequence dim) must be padded to.

    Context parallel cuts the sequence into ``2 * cp`` chunks, and sequence parallel splits each
    CP rank's ``s / cp`` tokens over the ``tp`` ranks: the lcm of ``2 * cp`` and ``tp * cp``.
    Neither: 1.
    """
    m = 1
    if sequence_parallel and tp > 1:
        m = math.lcm(m, tp * cp)
    if cp > 1:
        m = math.lcm(m, 2 * cp)
    return m


def padded_length(sample_lengths, cp: int) -> int:
    """Tokens of a packed row once each of its samples is padded for context parallel."""
    return sum(round_up(n, sample_multiple(cp)) for n in sample_lengths)


def load_balanced_indices(seq_lens: list[int], cp_size: int, cp_rank: int) -> Tensor:
    """Token indices rank ``cp_rank`` holds of sequences laid end to end with these lengths.

    Each length must be a multiple of ``2 * cp_size``; sequence ``i`` is cut into ``2 * cp_size``
    chunks and the rank keeps chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` (in that order).
    """
    pieces, start = [], 0
    for n in seq_lens:
        if n % (2 * cp_size):
            raise ValueError(f"context parallel: sequence length {n} is not a multiple of "
                             f"2 x context-parallel size = {2 * cp_size}")
        c = n // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
        start += n
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def slice_batch(batch, cp_size: int, cp_rank: int):
    """The tokens context-parallel rank ``cp_rank`` computes of a :class:`~megaswift.batch.TrainBatch`.

    Padded batches: the sequence dim is one sequence; the attention mask keeps the rank's query
    rows and every key column. THD batches: each sample by ``cu_seqlens_q_padded``.
    ``packed_seq_params`` keeps the global bounds (attention and RoPE work out the local layout
    from them); the token counts still describe the whole micro-batch.
    """
    if cp_size == 1:
        return batch
    p = batch.packed_seq_params
    if p is not None:
        cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        lens = (cu[1:] - cu[:-1]).tolist()
    else:
        lens = [batch.input_ids.shape[1]]
    idx = load_balanced_indices(lens, cp_size, cp_rank).to(batch.input_ids.device)
    pick = lambda x: x.index_select(1, idx)  # noqa: E731
    mask = batch.attention_mask
    if mask is not None:
        mask = mask.index_select(2, idx) if mask.shape[2] > 1 else mask
    pad = batch.padding_mask
    return dataclasses.replace(batch, input_ids=pick(batch.input_ids), labels=pick(batch.labels),
                               loss_mask=pick(batch.loss_mask), position_ids=pick(batch.position_ids),
                               attention_mask=mask, padding_mask=pick(pad) if pad is not None else None)


class _GatherOverCP(torch.autograd.Function):
    """All-gather along a new leading dim ``[cp, *x.shape]``; backward sums the gradients of
    every rank's copy and hands each rank its own slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, x, group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = grad.shape[0]
        grad = grad.contiguous().view(world * grad.shape[1], *grad.shape[2:])
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_kv(k: Tensor, v: Tensor, seq_lens: list[int], group) -> Tensor:
    """Every rank's K and V in global token order: ``[cp * t_local, 2, ...]`` (index 0 keys, 1 values).

    ``k``/``v`` hold this rank's load-balanced tokens (first dim) of sequences with ``seq_lens``
    global lengths. Backward reduce-scatters, so each rank gets the gradient of its own K/V.
    """
    cp = torch.distributed.get_world_size(group)
    t_local = k.shape[0]
    # rank r's tokens sit at the positions load_balanced_indices(.., r) names
    owner = torch.cat([load_balanced_indices(seq_lens, cp, r) for r in range(cp)]).to(k.device)
    kv = _GatherOverCP.apply(torch.stack([k, v], dim=1), group)  # [cp, t_local, 2, ...]
    return kv.reshape(cp * t_local, *kv.shape[2:]).index_select(0, torch.argsort(owner))


def query_chunks(seq_lens: list[int], cp: int, rank: int, causal: bool) -> Iterator[tuple[slice, slice]]:
    """(local query rows, global key range) of each chunk this rank holds, sequence by sequence.

    A causal chunk sees the prefix of its sequence that ends with the chunk (bottom-right
    aligned); a non-causal one the whole sequence.
    """
    start = 0
    for n in seq_lens:
        if n:
            c = n // (2 * cp)
            for half, chunk in enumerate((rank, 2 * cp - 1 - rank)):
                rows = slice(start // cp + half * c, start // cp + (half + 1) * c)
                yield rows, slice(start, start + ((chunk + 1) * c if causal else n))
        start += n
