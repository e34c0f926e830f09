"""Preference pairs (DPO and friends): from `--dataset` to tokenised (optionally packed) pairs.

    sources.load_sources  -> canonical rows; formats.py recognises the preference formats (ms-swift
                             `messages` + `rejected_response`, LLaMA-Factory sharegpt/alpaca ranking
                             rows, TRL `prompt`/`chosen`/`rejected`, `chosen_messages`/`rejected_messages`)
    rejected check        -> a row without a rejected response: with `--strict true` an error naming
                             file and row before any tokenisation; else dropped and counted ("no
                             rejected response"); every row without one: an error naming the first
    Template.encode       -> chosen = template(prompt + chosen), rejected = template(prompt + rejected);
                             labels per `--loss_scale`, whose `default` means `last_round` here (only the
                             final assistant turn is trained), so both share the prompt's tokens
    truncation            -> `--max_length` per sequence with `--truncation_strategy` as for sft
                             (delete: the pair is dropped when either sequence is too long)
    packing.pack_rows     -> `--packing true`: whole pairs bin-packed into rows of `--packing_length`
                             tokens (a pair is never split)

A tokenised pair row holds ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
``rejected_labels`` (labels unshifted, -100 where not trained) and ``length`` (chosen + rejected
tokens). A packed row holds ``input_ids`` and ``labels`` (its pairs' sequences concatenated in the
order chosen_0, rejected_0, chosen_1, ...), ``lengths`` (one per sequence, so 2 per pair) and
``pairs`` (how many pairs). :func:`megaswift.data.collate.collate_preference` batches either kind.

With `--packing true` a pair must fit one packed row: `--max_length` is capped at `--packing_length`
as for sft, and a pair whose two sequences together exceed it is dropped ("pair longer than
--packing_length") with `--truncation_strategy delete`, else its longer sequence is truncated
(per the strategy) to what the shorter leaves, both to half when neither fits in half.

`--lazy_tokenize true` (pairs encoded on access, dropped ones come back as None) and `--streaming
true` (encoded while read, with `--packing` packed on the fly) work as for sft. Counts go into the
same :class:`~megaswift.data.pipeline.DataStats`: ``rows`` are pairs, ``tokens`` and
``trained_tokens`` count both sequences, ``truncated`` the pairs with a truncated sequence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow.compute as pc

from megaswift.args.data import DataArgs
from megaswift.data.formats import RowError, SelfCognition
from megaswift.data.packing import efficiency, pack_rows, pack_stream
from megaswift.data.pipeline import (DataStats, LazyTokenized, PackedStream, _truncate, encode_dataset,
                                     finish_datasets)
from megaswift.data.sources import load_sources, split
from megaswift.data.template import IGNORE_INDEX, Template

logger = logging.getLogger("megaswift.data")

__all__ = ["PAIR_COLUMNS", "NO_REJECTED", "PAIR_TOO_LONG", "preference_loss_scale", "preference_template",
           "encode_pairs", "pair_as_row", "pack_pairs", "PackedPairStream", "LazyPairs", "tokenize_pairs",
           "build_preference_datasets", "is_preference_dataset"]

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
NO_REJECTED = "no rejected response"
PAIR_TOO_LONG = "pair longer than --packing_length"
_NO_REJECTED_DETAIL = ("a preference row needs a rejected answer: ms-swift `rejected_response`, "
                       "LLaMA-Factory/TRL `rejected`, or `rejected_messages`")
_FLAGS = ("__drop__", "__truncated__")
# map() fingerprints module functions by name only: key cached results to this file's code too
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def preference_loss_scale(loss_scale: str) -> str:
    """`--loss_scale` for preference training: ``default`` means ``last_round`` (labels on the final
    assistant turn only, ms-swift's rlhf default); ``last_round``/``all`` are kept."""
    return "last_round" if loss_scale == "default" else loss_scale


def preference_template(data: DataArgs, tokenizer) -> Template:
    """The chat template preference rows are encoded with (see :func:`preference_loss_scale`)."""
    return Template(tokenizer, data.template, data.system, preference_loss_scale(data.loss_scale))


def _no_trained(labels: list[int]) -> bool:
    return all(t == IGNORE_INDEX for t in labels[1:])


def _fit_pair(seqs: list[tuple[list[int], list[int]]], capacity: int,
              strategy: str) -> Optional[list[tuple[list[int], list[int]]]]:
    """Both sequences truncated (``strategy`` left/right) so that together they fit ``capacity``;
    None with ``delete``. The shorter keeps its length when it fits half, the longer gets the rest."""
    if strategy == "delete":
        return None
    lengths = [len(ids) for ids, _ in seqs]
    short = min(range(2), key=lambda k: (lengths[k], k))
    limits = [0, 0]
    if lengths[short] <= capacity // 2:
        limits[short], limits[1 - short] = lengths[short], capacity - lengths[short]
    else:
        limits = [capacity - capacity // 2, capacity // 2]
    return [_truncate(ids, labels, limit, strategy)[:2] for (ids, labels), limit in zip(seqs, limits)]


def encode_pairs(batch: dict[str, list], *, template: Template, max_length: Optional[int],
                 truncation_strategy: str, strict: bool, capacity: Optional[int] = None,
                 code_version: str = _CODE_VERSION) -> dict[str, list]:
    """Batched map function: canonical rows -> pair columns + ``length``, with ``__drop__`` (the
    reason a row is dropped, "" to keep it) and ``__truncated__``. ``strict``: the first row to drop
    raises RowError naming its file and row. ``capacity``: the packed row length a pair must fit."""
    out: dict[str, list] = {k: [] for k in (*PAIR_COLUMNS, "length", *_FLAGS)}
    for i in range(len(batch["messages"])):
        row = {k: batch[k][i] for k in batch}
        reason, detail, cut, seqs = "", "", False, []
        if row.get("rejected_response") is None:
            reason, detail = NO_REJECTED, _NO_REJECTED_DETAIL
        else:
            try:
                enc = template.encode(row)
            except ValueError as e:
                reason, detail = "template error", str(e)
            else:
                for key in ("", "rejected_"):
                    res = _truncate(enc[f"{key}input_ids"], enc[f"{key}labels"], max_length, truncation_strategy)
                    if res is None:
                        reason, detail = "too long", f"--max_length {max_length}"
                        break
                    seqs.append(res[:2])
                    cut |= res[2]
                if not reason and capacity and sum(len(ids) for ids, _ in seqs) > capacity:
                    fitted = _fit_pair(seqs, capacity, truncation_strategy)
                    if fitted is None:
                        reason = PAIR_TOO_LONG
                        detail = (f"{len(seqs[0][0])} + {len(seqs[1][0])} tokens > --packing_length {capacity} "
                                  f"(--truncation_strategy {truncation_strategy})")
                    else:
                        seqs, cut = fitted, True
                if not reason:
                    empty = [side for side, (_, labels) in zip(("chosen", "rejected"), seqs) if _no_trained(labels)]
                    if empty:
                        reason = "no trained tokens"
                        detail = f"the {' and '.join(empty)} sequence has none" + (
                            f" after truncation to --max_length {max_length}" if cut else "")
        if reason and strict:
            raise RowError(reason, detail, row.get("__source__"), row.get("__row__"))
        if reason:
            seqs = [(None, None), (None, None)]
        (c_ids, c_labels), (r_ids, r_labels) = seqs
        for k, v in zip(PAIR_COLUMNS, (c_ids, c_labels, r_ids, r_labels)):
            out[k].append(v)
        out["length"].append(0 if reason else len(c_ids) + len(r_ids))
        out["__drop__"].append(reason)
        out["__truncated__"].append(cut and not reason)
    return out


def pair_as_row(row: dict) -> dict:
    """One pair as a packable row: ``{"input_ids": chosen + rejected, "labels": ..., "lengths": [c, r]}``."""
    c, r = row["chosen_input_ids"], row["rejected_input_ids"]
    return {"input_ids": list(c) + list(r), "labels": list(row["chosen_labels"]) + list(row["rejected_labels"]),
            "lengths": [len(c), len(r)]}


def _with_pairs(packed: dict) -> dict:
    return {**packed, "pairs": len(packed["lengths"]) // 2}


def pack_pairs(ds: datasets.Dataset, capacity: int, stats: DataStats) -> datasets.Dataset:
    """`--packing true`: pairs bin-packed (by chosen + rejected tokens) into rows of at most
    ``capacity`` tokens; a pair's two sequences stay together and in order."""
    rows = [pair_as_row(r) for r in ds.select_columns(list(PAIR_COLUMNS)).to_list()]
    packed = [_with_pairs(p) for p in pack_rows(rows, capacity)]
    stats.packed_rows = len(packed)
    stats.packing_efficiency = round(efficiency(packed, capacity), 6)
    logger.info("packed %d pairs into %d rows of %d tokens: efficiency %.2f%%",
                len(ds), len(packed), capacity, 100 * stats.packing_efficiency)
    return datasets.Dataset.from_list(packed)


class PackedPairStream(PackedStream):
    """`--streaming true --packing true` for pairs: tokenised pairs packed on the fly (never split)."""

    def __iter__(self):
        return (_with_pairs(p) for p in pack_stream((pair_as_row(r) for r in self.rows), self.capacity))


class LazyPairs(LazyTokenized):
    """`--lazy_tokenize true`: canonical rows encoded into pairs on access; dropped rows come back as None."""

    def __init__(self, rows: datasets.Dataset, template: Template, data: DataArgs, capacity: Optional[int] = None):
        super().__init__(rows, template, data)
        self.capacity = capacity

    def __getitem__(self, i: int) -> Optional[dict]:
        batch = {k: [v] for k, v in self.rows[i].items()}
        out = encode_pairs(batch, template=self.template, max_length=self.data.max_length,
                           truncation_strategy=self.data.truncation_strategy, strict=self.data.strict,
                           capacity=self.capacity)
        reason = out["__drop__"][0]
        if reason:
            self.dropped[reason] += 1
            n = sum(self.dropped.values())
            if n <= self.LOG_FIRST:
                logger.warning("--lazy_tokenize: dropped %s row %s: %s%s", batch.get("__source__", ["?"])[0],
                               batch.get("__row__", ["?"])[0], reason,
                               "; further drops are not logged" if n == self.LOG_FIRST else "")
            return None
        return {k: out[k][0] for k in (*PAIR_COLUMNS, "length")}


def _check_rejected(rows: datasets.Dataset, *, strict: bool, dropped: Counter, specs: list[str]) -> datasets.Dataset:
    """Canonical rows without a rejected response, found before any tokenisation: RowError naming
    the first (``strict``, or when no row has one), else dropped and counted."""
    if len(rows) == 0:
        return rows
    column = rows.select_columns(["rejected_response"]).with_format("arrow")[:].column("rejected_response")
    missing = pc.is_null(column).to_numpy(zero_copy_only=False)
    n = int(missing.sum())
    if not n:
        return rows
    first = rows.select(np.flatnonzero(missing)[:LazyTokenized.LOG_FIRST].tolist())
    errors = [RowError(NO_REJECTED, _NO_REJECTED_DETAIL, source, row)
              for source, row in zip(first["__source__"], first["__row__"])]
    if strict:
        raise errors[0]
    if n == len(rows):
        raise ValueError(f"{errors[0]}; none of the {n} rows of {' '.join(specs)} has a rejected response: "
                         "preference training needs chosen/rejected pairs")
    for e in errors:
        logger.warning("dropped %s", e)
    logger.warning("dropped %d/%d rows of %s: %s", n, len(rows), " ".join(specs), NO_REJECTED)
    dropped[NO_REJECTED] += n
    return rows.select(np.flatnonzero(~missing).tolist())


def tokenize_pairs(rows, template: Template, data: DataArgs, stats: DataStats, capacity: Optional[int] = None):
    """Tokenised pairs for canonical ``rows`` (Dataset, IterableDataset, or `LazyPairs` with
    ``--lazy_tokenize``); drops and truncations counted in ``stats``."""
    if data.lazy_tokenize and isinstance(rows, datasets.Dataset):
        return LazyPairs(rows, template, data, capacity)
    return encode_dataset(rows, encode_pairs, dict(template=template, max_length=data.max_length, capacity=capacity,
                                                   truncation_strategy=data.truncation_strategy, strict=data.strict,
                                                   code_version=_CODE_VERSION),
                          data, stats, label_columns=("chosen_labels", "rejected_labels"), unit="pairs")


def build_preference_datasets(data: DataArgs, tokenizer) -> tuple[Any, Any, DataStats]:
    """(train, val or None, stats) of preference pairs, from the data flags and a tokenizer.

    The preference counterpart of :func:`megaswift.data.pipeline.build_datasets` (same sources,
    `--split_dataset_ratio`/`--val_dataset`, `--data_seed`, shuffling, `--strict`, datasets'
    cache so that rank 0 can tokenise first and the other ranks read its cache). train/val are
    `datasets.Dataset`s of pair rows (or of packed rows with `--packing true`), `LazyPairs`
    (`--lazy_tokenize`) or streams (`--streaming`: an IterableDataset, or a `PackedPairStream`).
    """
    if not data.dataset:
        raise ValueError("--dataset is required (one or more files, directories or hub ids)")
    template = preference_template(data, tokenizer)
    capacity = data.resolved_packing_length if data.packing else None
    if capacity and (data.max_length is None or data.max_length > capacity):
        data = dataclasses.replace(data, max_length=capacity)  # no sequence longer than a packed row
    stats, val_stats = DataStats(), DataStats()
    kw = dict(seed=data.data_seed, columns=data.column_map, streaming=data.streaming,
              strict=data.strict, num_proc=data.dataset_num_proc, shuffle=data.dataset_shuffle,
              self_cognition=SelfCognition(data.model_name, data.model_author))
    train_rows, dropped = load_sources(data.dataset, **kw)
    val_rows, val_dropped = None, Counter()
    if data.val_dataset:
        val_rows, val_dropped = load_sources(data.val_dataset, **kw)
    if isinstance(train_rows, datasets.Dataset):  # streams find them while read
        train_rows = _check_rejected(train_rows, strict=data.strict, dropped=dropped, specs=data.dataset)
    if isinstance(val_rows, datasets.Dataset):
        val_rows = _check_rejected(val_rows, strict=data.strict, dropped=val_dropped, specs=data.val_dataset)
    if not data.val_dataset:
        train_rows, val_rows = split(train_rows, data.split_dataset_ratio, data.data_seed)
    if isinstance(train_rows, datasets.IterableDataset) and data.dataset_shuffle:
        train_rows = train_rows.shuffle(seed=data.data_seed, buffer_size=data.shuffle_buffer_size)
    stats.dropped.update(dropped)
    val_stats.dropped.update(val_dropped)
    train = tokenize_pairs(train_rows, template, data, stats, capacity)
    val = tokenize_pairs(val_rows, template, data, val_stats, capacity) if val_rows is not None else None
    return finish_datasets(train, val, data, (stats, val_stats), (dropped, val_dropped), capacity, pack_pairs,
                           PackedPairStream, kind="preference")


def is_preference_dataset(ds) -> bool:
    """True for what :func:`build_preference_datasets` makes (pair rows or packed rows of pairs),
    e.g. to check a `--cached_dataset` against the training method before any work."""
    if isinstance(ds, (LazyPairs, PackedPairStream)):
        return True
    columns = getattr(ds, "column_names", None) or ()
    return "chosen_input_ids" in columns or "pairs" in columns
