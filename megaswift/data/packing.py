"""Bin packing of tokenised samples into rows of at most ``capacity`` tokens (``--packing``).

Best-fit decreasing: samples are placed longest first (ties: lower index first), each into the
open bin with the least room that still fits it (ties: the older bin), else into a new bin.
Open bins are kept in a list sorted by (room, bin number), searched with ``bisect``, so the
result depends only on the lengths and the capacity. Bins whose room drops below the shortest
sample are closed, which keeps the list short.

A packed row concatenates its samples' ``input_ids`` and (unshifted) ``labels`` and records the
boundaries in ``lengths``; the collator turns them into separate THD segments.

Streams (``--streaming true --packing true``) are packed on the fly by :func:`pack_stream`: the
same best-fit decreasing over a window of ``window`` samples (ms-swift's ``packing_interval``,
128) plus the samples of the previous window's emptiest bin, which is carried over instead of
being emitted half full (the end of the stream flushes every bin). Memory stays bounded and the
output is a pure function of the stream, so a resumed run re-creates the same rows. A window
holding the whole stream gives exactly :func:`pack_rows`.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Iterable, Iterator, Sequence

__all__ = ["pack", "pack_rows", "pack_stream", "efficiency", "STREAM_WINDOW"]

STREAM_WINDOW = 128  # samples packed together on the fly (ms-swift's packing_interval)


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into bins of at most ``capacity`` tokens.

    Deterministic; bins are in creation order, indices inside a bin ascending. A sample longer
    than ``capacity`` (or empty) is a ValueError naming its index: truncate first.
    """
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing length "
                             f"{capacity}; truncate it (--max_length) first")
        if n < 1:
            raise ValueError(f"sample {i} is empty")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shortest = lengths[order[-1]]
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        n = lengths[i]
        k = bisect_left(open_bins, (n, -1))  # first bin with room >= n (oldest among equals)
        if k < len(open_bins):
            room, b = open_bins.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        room -= n
        if room >= shortest:
            insort(open_bins, (room, b))
    return [sorted(b) for b in bins]


def _packed_row(rows: Sequence[dict], indices: Sequence[int]) -> dict:
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for i in indices:
        row = rows[i]
        if len(row["labels"]) != len(row["input_ids"]):
            raise ValueError(f"row {i}: {len(row['input_ids'])} input_ids but "
                             f"{len(row['labels'])} labels")
        ids.extend(row["input_ids"])
        labels.extend(row["labels"])
        lengths.extend(row.get("lengths") or [len(row["input_ids"])])
    return {"input_ids": ids, "labels": labels, "lengths": lengths}


def pack_rows(rows: Sequence[dict], capacity: int) -> list[dict]:
    """Packed rows ``{"input_ids", "labels", "lengths"}`` from tokenised rows.

    Rows that are already packed contribute their own ``lengths`` (sample boundaries are kept).
    """
    return [_packed_row(rows, b) for b in pack([len(r["input_ids"]) for r in rows], capacity)]


def pack_stream(rows: Iterable[dict], capacity: int, window: int = STREAM_WINDOW) -> Iterator[dict]:
    """Packed rows, as :func:`pack_rows` makes them, from a stream of tokenised rows.

    Every ``window`` new rows, the rows at hand are packed; every bin but the emptiest (ties: the
    newest) is emitted, in creation order, and the emptiest bin's rows wait for the next window.
    The rows left when the stream ends are packed and emitted. Deterministic.
    """
    if window < 1:
        raise ValueError(f"packing window must be >= 1, got {window}")
    buf: list[dict] = []
    fresh = 0
    for row in rows:
        buf.append(row)
        fresh += 1
        if fresh < window:
            continue
        bins = pack([len(r["input_ids"]) for r in buf], capacity)
        fill = [sum(len(buf[i]["input_ids"]) for i in b) for b in bins]
        keep = min(range(len(bins)), key=lambda k: (fill[k], -k))  # emptiest, newest among equals
        for k, b in enumerate(bins):
            if k != keep:
                yield _packed_row(buf, b)
        buf, fresh = [buf[i] for i in bins[keep]], 0
    yield from pack_rows(buf, capacity)


def efficiency(bins_or_rows: Sequence, capacity: int, lengths: Sequence[int] | None = None) -> float:
    """Real tokens / (number of bins * capacity).

    Accepts packed rows (dicts with ``input_ids``) or bins of sample indices from :func:`pack`
    together with the samples' ``lengths``.
    """
    if not bins_or_rows:
        return 0.0
    if isinstance(bins_or_rows[0], dict):
        real = sum(len(r["input_ids"]) for r in bins_or_rows)
    else:
        if lengths is None:
            raise ValueError("efficiency() of index bins needs the samples' lengths")
        real = sum(lengths[i] for b in bins_or_rows for i in b)
    return real / (len(bins_or_rows) * capacity)
