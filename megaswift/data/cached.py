"""Cached datasets: tokenise (and pack) once with `megatron export --to_cached_dataset true`,
then train from the result with `--cached_dataset <dir>`.

    <dir>/train/        datasets.save_to_disk: input_ids, labels, length | lengths (packed);
                        preference pairs (preference=True): chosen_input_ids, chosen_labels,
                        rejected_input_ids, rejected_labels, length | input_ids, labels, lengths, pairs
    <dir>/val/          same, when a validation split exists
    <dir>/stats.json    rows, dropped, truncated, tokens, packing_efficiency, ...
    <dir>/data_args.json  the data flags that produced it
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import datasets

from megaswift.args.data import DataArgs
from megaswift.data.pipeline import DataStats, build_datasets

STATS = "stats.json"


def write_cached_dataset(data: DataArgs, tokenizer, out: Path, *, preference: bool = False) -> DataStats:
    """Tokenise `data` with `tokenizer` into `out` (which the caller stages and publishes).

    ``preference=True``: preference pairs (`build_preference_datasets`); stats.json then also
    holds ``"preference": true``, and `preference.is_preference_dataset` recognises the loaded sets."""
    if data.lazy_tokenize or data.streaming:
        raise ValueError("--to_cached_dataset tokenises everything now: drop --lazy_tokenize/--streaming")
    if preference:
        from megaswift.data.preference import build_preference_datasets

        train, val, stats = build_preference_datasets(data, tokenizer)
    else:
        train, val, stats = build_datasets(data, tokenizer)
    train.save_to_disk(str(out / "train"))
    if val is not None:
        val.save_to_disk(str(out / "val"))
    record = {**stats.as_json(), **({"preference": True} if preference else {})}
    (out / STATS).write_text(json.dumps(record, indent=2) + "\n")
    (out / "data_args.json").write_text(json.dumps(asdict(data), indent=2) + "\n")
    return stats


def load_cached_datasets(dirs: list[str]) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """(train, val or None) from one or more cached dataset directories, concatenated."""
    trains, vals = [], []
    for d in dirs:
        root = Path(d).expanduser()
        if not (root / STATS).exists() or not (root / "train").is_dir():
            raise FileNotFoundError(f"--cached_dataset {d}: not a cached dataset (no {STATS} or train/); "
                                    "write one with `megatron export --to_cached_dataset true`")
        trains.append(datasets.load_from_disk(str(root / "train")))
        if (root / "val").is_dir():
            vals.append(datasets.load_from_disk(str(root / "val")))
    train = trains[0] if len(trains) == 1 else datasets.concatenate_datasets(trains)
    val = None if not vals else vals[0] if len(vals) == 1 else datasets.concatenate_datasets(vals)
    return train, val
