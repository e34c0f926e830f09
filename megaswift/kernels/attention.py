"""Core attention (softmax(q k^T * scale) v): plain-torch reference, SDPA-based fused version.

Pure torch, no megatron import (the context-parallel layout comes from
``megaswift.context_parallel``). Two layouts, both as megatron-core hands them to core attention:

* ``sbhd`` (no ``cu_seqlens``): q ``[s, b, hq, d]``, k/v ``[s, b, hkv, d]``; returns ``[s, b, hq*d]``.
* ``thd`` (``cu_seqlens`` given, packed samples): q ``[t, hq, d]``, k/v ``[t, hkv, d]``;
  ``cu_seqlens`` is an int tensor ``[n+1]`` of cumulative sample lengths (starting at 0).
  Samples never attend to each other; tokens past ``cu_seqlens[-1]`` belong to no sample and
  get a zero output. Returns ``[t, hq*d]``.

Common rules:

* GQA: ``hq`` must be a multiple of ``hkv``; query head ``i`` uses kv head ``i // (hq // hkv)``.
* ``attention_mask`` (sbhd only): bool, broadcastable to ``[b, 1, sq, sk]``, True = masked out
  (megatron's convention). It is OR-ed with the causal mask.
* ``causal``: query ``i`` sees key ``j`` iff ``j <= i + (sk - sq)`` (bottom-right aligned; the
  usual lower triangle when ``sq == sk``).
* A query row with every key masked out (e.g. a padding row) gives a zero output (and zero
  gradients), never NaN.
* The softmax runs in float32 whatever the input dtype; the output has the input dtype.
* ``softmax_scale`` defaults to ``1 / sqrt(d)``.
* ``dropout_p`` drops attention probabilities (pass 0 outside training).
* ``cp_group``: context parallelism (see below); None or a one-rank group means none.

Context parallel (``cp_group`` of ``cp`` ranks), megatron's load-balanced layout: every sequence
(sbhd: the whole sequence dim; thd: each ``cu_seqlens`` segment, which must then be the
*padded* bounds, every segment a multiple of ``2 * cp``, ``cu_seqlens[-1] == cp * t``) is cut into
``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``, concatenated, in
q, k and v (``megaswift/context_parallel.py`` holds the layout). K/V are all-gathered over the group
(backward: reduce-scattered), so each query chunk sees the keys of its whole sequence; the causal
mask follows the chunks' global positions, and ``attention_mask`` (sbhd) is ``[b, 1, local sq,
global sk]``. Outputs keep the local layout. Each rank does the same work (the two chunks of a
causal sequence cost the same in total on every rank).

``attention(kernel=...)`` is the selector; which kernel runs is the runtime's decision
(``megaswift/runtime/context.py``: ``--attention_backend``, ``MEGASWIFT_ATTENTION`` overrides).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megaswift.context_parallel import gather_kv, query_chunks

__all__ = ["reference", "fused", "attention", "KERNELS"]

KERNELS = ("fused", "reference")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _cp_size_rank(cp_group) -> tuple[int, int]:
    if cp_group is None:
        return 1, 0
    return torch.distributed.get_world_size(cp_group), torch.distributed.get_rank(cp_group)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens, attention_mask) -> None:
    want = 3 if cu_seqlens is not None else 4
    layout = "thd [t, heads, dim]" if want == 3 else "sbhd [s, b, heads, dim]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != want:
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(x.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq % hkv != 0:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"attention: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("attention: attention_mask is for sbhd only; thd masks come from cu_seqlens")
        if q.shape[0] != k.shape[0]:
            raise ValueError("attention: thd needs as many key tokens as query tokens (self-attention)")
    elif q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: batch sizes differ: q {q.shape[1]}, k {k.shape[1]}")


def _sample_bounds(cu_seqlens: Tensor, total: int) -> list:
    """cu_seqlens as a python list, validated (starts at 0, non-decreasing, <= total tokens)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"attention: cu_seqlens must be 1-D [n+1], got shape {tuple(cu_seqlens.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[-1] > total:
        raise ValueError(
            f"attention: cu_seqlens must start at 0, not decrease and end <= {total} tokens; got {bounds}"
        )
    return bounds


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _causal_masked(sq: int, sk: int, device) -> Tensor:
    """[sq, sk] bool, True where key j is in the future of query i (bottom-right aligned)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=sk - sq + 1)


def _scale(q: Tensor, softmax_scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


# --------------------------------------------------------------------------------------------
# reference: the readable spec
# --------------------------------------------------------------------------------------------


def _reference_bhsd(q: Tensor, k: Tensor, v: Tensor, masked: Tensor, scale: float, dropout_p: float) -> Tensor:
    """q [B, hq, sq, d], k/v [B, hkv, sk, d], masked bool broadcastable to [B, hq, sq, sk]."""
    out_dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # query head i -> kv head i // group
    v = v.repeat_interleave(group, dim=1)

    scores = (q @ k.transpose(-1, -2)) * scale  # [B, hq, sq, sk], float32
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    # exact zeros where masked; a fully-masked row (uniform above) becomes all zeros -> output 0
    probs = probs.masked_fill(masked, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs @ v).to(out_dtype)  # [B, hq, sq, dv]


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    cp_group=None,
) -> Tensor:
    """Plain-torch attention with explicit scores and masks (see the module docstring)."""
    _check_inputs(q, k, v, cu_seqlens, attention_mask)
    if _cp_size_rank(cp_group)[0] > 1:
        return _context_parallel(reference, q, k, v, cu_seqlens, attention_mask, causal,
                                 softmax_scale, dropout_p, cp_group)
    scale = _scale(q, softmax_scale)

    if cu_seqlens is None:  # sbhd
        sq, b, hq, _ = q.shape
        sk = k.shape[0]
        masked = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
        if causal:
            masked = masked | _causal_masked(sq, sk, q.device)
        if attention_mask is not None:
            masked = masked | _bool_mask(attention_mask)  # -> [b, 1, sq, sk]
        qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [s, b, h, d] -> [b, h, s, d]
        out = _reference_bhsd(qb, kb, vb, masked, scale, dropout_p)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    # thd: one dense [t, t] problem with a block-diagonal (and causal) mask
    t = q.shape[0]
    bounds = _sample_bounds(cu_seqlens, t)
    sample_of = torch.full((t,), -1, dtype=torch.long, device=q.device)  # -1: no sample
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        sample_of[start:end] = i
    same_sample = (sample_of[:, None] == sample_of[None, :]) & (sample_of[:, None] >= 0)
    masked = ~same_sample
    if causal:
        masked = masked | _causal_masked(t, t, q.device)
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [t, h, d] -> [1, h, t, d]
    out = _reference_bhsd(qb, kb, vb, masked, scale, dropout_p)
    return out[0].transpose(0, 1).reshape(t, -1)


# --------------------------------------------------------------------------------------------
# fused: torch scaled_dot_product_attention
# --------------------------------------------------------------------------------------------


def _sdpa_supports_gqa() -> bool:
    try:
        x = torch.zeros(1, 2, 1, 1)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_supports_gqa()


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, *, attn_mask=None, is_causal=False) -> Tensor:
    """SDPA on [B, h, s, d] tensors with GQA. attn_mask here is SDPA's: True = may attend."""
    hq, hkv = q.shape[1], k.shape[1]
    extra = {}
    if hq != hkv:
        if _SDPA_GQA:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra
    )


def fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    cp_group=None,
) -> Tensor:
    """Same contract as :func:`reference`, computed with ``scaled_dot_product_attention``.

    thd runs SDPA once per packed sample (is_causal within the sample) rather than one dense
    [t, t] masked problem: exact, and cheaper since cross-sample blocks are never computed.
    """
    _check_inputs(q, k, v, cu_seqlens, attention_mask)
    if _cp_size_rank(cp_group)[0] > 1:
        return _context_parallel(fused, q, k, v, cu_seqlens, attention_mask, causal,
                                 softmax_scale, dropout_p, cp_group)
    scale = _scale(q, softmax_scale)

    if cu_seqlens is None:  # sbhd
        sq, b, hq, _ = q.shape
        sk = k.shape[0]
        qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        if attention_mask is None and (not causal or sq == sk):
            out = _sdpa(qb, kb, vb, scale, dropout_p, is_causal=causal)
        else:
            masked = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
            if causal:
                masked = masked | _causal_masked(sq, sk, q.device)
            if attention_mask is not None:
                masked = masked | _bool_mask(attention_mask)
            allowed = ~masked
            row_ok = allowed.any(dim=-1, keepdim=True)  # False for fully-masked query rows
            # let fully-masked rows attend everywhere (finite math), then zero them below
            out = _sdpa(qb, kb, vb, scale, dropout_p, attn_mask=allowed | ~row_ok)
            out = out.masked_fill(~row_ok, 0.0)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    # thd: one SDPA call per sample
    t, hq, _ = q.shape
    bounds = _sample_bounds(cu_seqlens, t)
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, L, d]
        out = _sdpa(qs, ks, vs, scale, dropout_p, is_causal=causal)
        pieces.append(out[0].transpose(0, 1))  # [L, hq, dv]
    if bounds[-1] < t:  # tokens after the last sample: no keys to see
        pieces.append(q.new_zeros(t - bounds[-1], hq, v.shape[-1]))
    if not pieces:
        return q.new_zeros(t, hq * v.shape[-1])
    return torch.cat(pieces, dim=0).reshape(t, -1)


# --------------------------------------------------------------------------------------------
# context parallel: K/V all-gathered over the group, queries stay local
# --------------------------------------------------------------------------------------------


def _context_parallel(impl, q, k, v, cu_seqlens, attention_mask, causal, softmax_scale, dropout_p, cp_group):
    """Attention of this rank's two chunks per sequence against the gathered keys (module doc).

    Every query chunk is one bottom-right-aligned problem against the prefix of its sequence
    that ends with the chunk (the whole sequence when not causal), solved by ``impl`` without CP.
    """
    cp, rank = _cp_size_rank(cp_group)
    t_local = q.shape[0]
    if cu_seqlens is not None:
        bounds = _sample_bounds(cu_seqlens, cp * t_local)
        if bounds[-1] != cp * t_local:
            raise ValueError(f"attention (context parallel): cu_seqlens must end at {cp} x {t_local} "
                             f"local tokens = {cp * t_local}, got {bounds[-1]}")
    else:
        bounds = [0, cp * t_local]
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    kv = gather_kv(k, v, lens, cp_group)  # also checks every length is a multiple of 2 x cp
    kw = dict(causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p)
    outs = []
    for rows, key_range in query_chunks(lens, cp, rank, causal):
        keys = kv[key_range]
        qb, kb, vb = q[rows], keys[:, 0], keys[:, 1]
        if cu_seqlens is not None:  # one sequence: sbhd with b = 1
            out = impl(qb.unsqueeze(1), kb.unsqueeze(1), vb.unsqueeze(1), **kw).squeeze(1)
        else:
            mask = None
            if attention_mask is not None:
                m = _bool_mask(attention_mask)
                m = m.expand(*m.shape[:-2], t_local, m.shape[-1]) if m.shape[-2] == 1 else m
                mask = m[..., rows, :keys.shape[0]]
            out = impl(qb, kb, vb, attention_mask=mask, **kw)
        outs.append(out)
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------
# selector
# --------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    cp_group=None,
    kernel: str = "fused",
) -> Tensor:
    """Core attention with the named kernel: :func:`fused` (default) or :func:`reference`."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    impl = fused if kernel == "fused" else reference
    return impl(
        q,
        k,
        v,
        cu_seqlens=cu_seqlens,
        attention_mask=attention_mask,
        causal=causal,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        cp_group=cp_group,
    )
