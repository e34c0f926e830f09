"""From `--dataset` to tokenised (and optionally packed) training and validation sets.

    sources.load_sources  -> canonical rows (bad rows raised or dropped and counted)
    Template.encode       -> input_ids / labels (assistant tokens only, per --loss_scale)
    truncation            -> --max_length with --truncation_strategy delete|left|right
    packing.pack_rows     -> --packing: bins of --packing_length tokens, sample boundaries kept

Tokenisation runs ahead in `--dataset_num_proc` processes (datasets' progress bar), lazily on
access with `--lazy_tokenize true` (rows dropped then come back as None), or as a stream with
`--streaming true`: the canonical rows pass a `--shuffle_buffer_size` shuffle buffer (ms-swift's
`--dataset_shuffle`, seeded by `--data_seed`, re-seeded per epoch by `set_epoch`), are tokenised
as they are read and, with `--packing true`, packed on the fly (`PackedStream`). Every dropped
or truncated row is counted in `DataStats`, which `--to_cached_dataset` writes as stats.json
(streams count while they are read). A training set left without rows is an error naming the
reasons, e.g. `--max_length 256 drops 40/40 rows as too long`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import datasets
import torch

from megaswift.args.data import DataArgs
from megaswift.data.formats import RowError, SelfCognition
from megaswift.data.packing import efficiency, pack_rows, pack_stream
from megaswift.data.sources import drop_summary, load_sources, split
from megaswift.data.template import IGNORE_INDEX, Template

logger = logging.getLogger("megaswift.data")
_KEEP = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")


@dataclass
class DataStats:
    """What happened to the rows; written as stats.json by `--to_cached_dataset`."""
    rows: int = 0
    dropped: dict = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packed_rows: Optional[int] = None
    packing_efficiency: Optional[float] = None
    val: Optional[dict] = None  # the same figures for the validation split

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped_total"] = sum(self.dropped.values())
        return out


def _truncate(ids: list[int], labels: list[int], max_length: Optional[int], strategy: str):
    """(ids, labels, truncated) or None when the row must be deleted."""
    if not max_length or len(ids) <= max_length:
        return ids, labels, False
    if strategy == "delete":
        return None
    if strategy == "left":
        return ids[-max_length:], labels[-max_length:], True
    return ids[:max_length], labels[:max_length], True


def encode_rows(batch: dict[str, list], *, template: Template, max_length: Optional[int],
                truncation_strategy: str, strict: bool) -> dict[str, list]:
    """Batched map function: encode, truncate, and flag rows to drop (`__drop__` = reason)."""
    n = len(batch["messages"])
    out: dict[str, list] = {k: [] for k in (*_KEEP, "length", "__drop__", "__truncated__")}
    for i in range(n):
        row = {k: batch[k][i] for k in batch}
        enc, reason, cut = None, "", False
        try:
            enc = template.encode(row)
        except ValueError as e:
            if strict:
                raise RowError("template error", str(e), row.get("__source__"), row.get("__row__")) from e
            reason = "template error"
        if enc is not None:
            for key in ("", "rejected_"):
                if enc.get(f"{key}input_ids") is None:
                    continue
                res = _truncate(enc[f"{key}input_ids"], enc[f"{key}labels"], max_length, truncation_strategy)
                if res is None:
                    reason = "too long"
                    break
                enc[f"{key}input_ids"], enc[f"{key}labels"], was_cut = res
                cut |= was_cut
            if not reason and all(t == IGNORE_INDEX for t in enc["labels"][1:]):
                reason = "no trained tokens"  # e.g. truncation cut every assistant token
        if reason and strict and reason != "template error":
            raise RowError(reason, f"--max_length {max_length}", row.get("__source__"), row.get("__row__"))
        enc = enc if not reason else {}
        for k in _KEEP:
            out[k].append(enc.get(k))
        out["length"].append(len(enc.get("input_ids") or []))
        out["__drop__"].append(reason)
        out["__truncated__"].append(cut and not reason)
    return out


class LazyTokenized(torch.utils.data.Dataset):
    """`--lazy_tokenize true`: canonical rows encoded on access; dropped rows come back as None."""

    LOG_FIRST = 10

    def __init__(self, rows: datasets.Dataset, template: Template, data: DataArgs):
        self.rows, self.template, self.data = rows, template, data
        self.dropped: Counter = Counter()  # rows dropped on access in this process, by reason

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Optional[dict]:
        batch = {k: [v] for k, v in self.rows[i].items()}
        out = encode_rows(batch, template=self.template, max_length=self.data.max_length,
                          truncation_strategy=self.data.truncation_strategy, strict=self.data.strict)
        if out["__drop__"][0]:
            reason = out["__drop__"][0]
            self.dropped[reason] += 1
            if sum(self.dropped.values()) <= self.LOG_FIRST:
                logger.warning("--lazy_tokenize: dropped %s row %s: %s (--max_length %s)%s",
                               batch.get("__source__", ["?"])[0], batch.get("__row__", ["?"])[0], reason,
                               self.data.max_length,
                               "; further drops are not logged" if sum(self.dropped.values()) == self.LOG_FIRST else "")
            return None
        return {k: out[k][0] for k in _KEEP if out[k][0] is not None}


class _DropCounter:
    """Stream filter: keeps rows that were not flagged by encode_rows, counts the others."""

    def __init__(self, counts: dict):
        self.counts = counts

    def __call__(self, row: dict) -> bool:
        if not row["__drop__"]:
            return True
        self.counts[row["__drop__"]] = self.counts.get(row["__drop__"], 0) + 1
        return False


class PackedStream:
    """`--streaming true --packing true`: a tokenised stream packed on the fly into rows of
    `capacity` tokens (`packing.pack_stream`), re-created identically on every pass."""

    def __init__(self, rows: datasets.IterableDataset, capacity: int):
        self.rows, self.capacity = rows, capacity

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)

    def __iter__(self):
        return pack_stream(iter(self.rows), self.capacity)


def is_stream(ds) -> bool:
    """True for `--streaming` datasets: no length, read in order."""
    return isinstance(ds, (datasets.IterableDataset, PackedStream))


def tokenize(rows, template: Template, data: DataArgs, stats: DataStats):
    """Tokenised dataset for canonical `rows` (Dataset, IterableDataset or LazyTokenized)."""
    if data.lazy_tokenize and isinstance(rows, datasets.Dataset):
        return LazyTokenized(rows, template, data)
    kept = encode_dataset(rows, encode_rows, dict(template=template, max_length=data.max_length,
                                                  truncation_strategy=data.truncation_strategy, strict=data.strict),
                          data, stats, label_columns=("labels",), unit="rows")
    if isinstance(kept, datasets.Dataset):
        unused = [c for c in ("rejected_input_ids", "rejected_labels") if all(v is None for v in kept[c])]
        kept = kept.remove_columns(unused)
    return kept


def encode_dataset(rows, encode, fn_kwargs: dict, data: DataArgs, stats: DataStats, *,
                   label_columns: tuple, unit: str):
    """`rows` mapped by the batched `encode` (which flags each row `__drop__` with a reason and
    `__truncated__`): a stream is filtered as read; a dataset is filtered now, with its dropped,
    truncated, row and token counts added to `stats` and one log line."""
    kw = dict(batched=True, remove_columns=list(rows.column_names or []), fn_kwargs=fn_kwargs)
    flags = ["__drop__", "__truncated__"]
    if isinstance(rows, datasets.IterableDataset):
        return rows.map(encode, **kw).filter(_DropCounter(stats.dropped)).remove_columns(flags)
    t0 = time.time()
    mapped = rows.map(encode, num_proc=data.dataset_num_proc if len(rows) > 1 else None,
                      desc=f"Tokenizing {unit}", **kw)
    drops = Counter(r for r in mapped["__drop__"] if r)
    for reason, n in drops.items():
        stats.dropped[reason] = stats.dropped.get(reason, 0) + n
    truncated = sum(mapped["__truncated__"])
    stats.truncated += truncated
    kept = mapped.filter(lambda d: [not f for f in d], input_columns="__drop__", batched=True).remove_columns(flags)
    lengths = kept["length"]
    stats.rows += len(kept)
    stats.tokens += sum(lengths)
    stats.trained_tokens += sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for col in label_columns for lab in kept[col])
    dt = max(time.time() - t0, 1e-9)
    logger.info("tokenised %d %s (%d tokens) in %.1fs: %.0f %s/s; dropped %s; truncated %d", len(mapped), unit,
                sum(lengths), dt, len(mapped) / dt, unit, dict(drops) or "none", truncated)
    return kept


def pack_dataset(ds: datasets.Dataset, capacity: int, stats: DataStats) -> datasets.Dataset:
    """`--packing true`: bin-pack tokenised rows into rows of at most `capacity` tokens."""
    rows = pack_rows(ds.select_columns(["input_ids", "labels"]).to_list(), capacity)
    stats.packed_rows = len(rows)
    stats.packing_efficiency = round(efficiency(rows, capacity), 6)
    logger.info("packed %d samples into %d rows of %d tokens: efficiency %.2f%%",
                len(ds), len(rows), capacity, 100 * stats.packing_efficiency)
    return datasets.Dataset.from_list(rows)


def _no_rows(what: str, specs: list[str], dropped: dict, data: DataArgs) -> ValueError:
    summary = drop_summary(dropped, sum(dropped.values()), data.max_length, data.truncation_strategy)
    return ValueError(f"no usable {what} rows in {' '.join(specs)}: {summary}")


def _first_row(stream, what: str, specs: list[str], counts: list[dict], data: DataArgs) -> None:
    """Read a stream up to its first usable row: a stream without one fails now, before training."""
    for _ in stream:
        return
    dropped = Counter()
    for c in counts:
        dropped.update(c)
    raise _no_rows(f"{what} (streamed)", specs, dropped, data)


def build_datasets(data: DataArgs, tokenizer) -> tuple[Any, Any, DataStats]:
    """(train, val or None, stats) ready for batching, from the data flags and a tokenizer.

    train/val are `datasets.Dataset`s (tokenised ahead, optionally packed), `LazyTokenized`
    (`--lazy_tokenize`) or streams (`--streaming`: an IterableDataset, or a `PackedStream`).
    """
    if not data.dataset:
        raise ValueError("--dataset is required (one or more files, directories or hub ids)")
    template = Template(tokenizer, data.template, data.system, data.loss_scale)
    if data.packing and (data.max_length is None or data.max_length > data.resolved_packing_length):
        # a sample longer than a packed row cannot be packed: truncate to the row length
        data = dataclasses.replace(data, max_length=data.resolved_packing_length)
    stats, val_stats = DataStats(), DataStats()
    kw = dict(seed=data.data_seed, columns=data.column_map, streaming=data.streaming,
              strict=data.strict, num_proc=data.dataset_num_proc, shuffle=data.dataset_shuffle,
              self_cognition=SelfCognition(data.model_name, data.model_author))
    train_rows, dropped = load_sources(data.dataset, **kw)
    val_dropped: Counter = Counter()
    if data.val_dataset:
        val_rows, val_dropped = load_sources(data.val_dataset, **kw)
    else:
        train_rows, val_rows = split(train_rows, data.split_dataset_ratio, data.data_seed)
    if isinstance(train_rows, datasets.IterableDataset) and data.dataset_shuffle:
        train_rows = train_rows.shuffle(seed=data.data_seed, buffer_size=data.shuffle_buffer_size)
    stats.dropped.update(dropped)
    val_stats.dropped.update(val_dropped)
    train = tokenize(train_rows, template, data, stats)
    val = None
    if val_rows is not None:
        val = tokenize(val_rows, template, data, val_stats)
    return finish_datasets(train, val, data, (stats, val_stats), (dropped, val_dropped),
                           data.resolved_packing_length if data.packing else None, pack_dataset, PackedStream)


def finish_datasets(train, val, data: DataArgs, stats: tuple, dropped: tuple, capacity: Optional[int],
                    pack, packed_stream, kind: str = ""):
    """The common end of building datasets (rows or preference pairs): a split with no row left
    is an error naming the sources and why rows were dropped; then packing into rows of
    ``capacity`` (``pack`` for datasets, ``packed_stream`` for streams); returns (train, val, stats)."""
    (train_stats, val_stats), (train_dropped, val_dropped) = stats, dropped
    if isinstance(val, datasets.Dataset) and len(val) == 0 and not data.val_dataset:
        # rows held out by --split_dataset_ratio (its default is 0.01: often one row) that all dropped:
        # the run trains without evaluation rather than failing on a validation set nobody asked for
        logger.warning("no usable validation rows among those --split_dataset_ratio %s held out (%s): training "
                       "without evaluation; pass --val_dataset or a larger --split_dataset_ratio for one",
                       data.split_dataset_ratio, drop_summary(val_stats.dropped, sum(val_stats.dropped.values()),
                                                              data.max_length, data.truncation_strategy))
        val = None
    for ds, what, specs, st, counts in ((train, "training", data.dataset, train_stats, train_dropped),
                                       (val, "validation", data.val_dataset or data.dataset, val_stats, val_dropped)):
        what = f"{what} {kind}".strip()
        if isinstance(ds, datasets.Dataset) and len(ds) == 0:
            raise _no_rows(what, specs, st.dropped, data)
        if isinstance(ds, datasets.IterableDataset):
            _first_row(ds, what, specs, [counts, st.dropped], data)
    if capacity:
        if isinstance(train, datasets.IterableDataset):
            train = packed_stream(train, capacity)
            val = packed_stream(val, capacity) if val is not None else None
        else:
            train = pack(train, capacity, train_stats)
            if val is not None:
                val = pack(val, capacity, val_stats)
    if val is not None:
        train_stats.val = val_stats.as_json()
    return train, val, train_stats
