"""Load raw rows from dataset sources (files, directories, saved datasets, hub ids) with HF ``datasets``.

A source spec is a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.txt`` file, a directory
of such files (all of them, sorted, recursively), a ``Dataset.save_to_disk`` directory or a hub
id ``org/name`` (optionally ``org/name:subset``). A ``#N`` suffix samples N rows (seeded;
when N exceeds the rows, the whole dataset is repeated and the remainder sampled, as ms-swift).

Every loaded dataset carries ``__source__`` (the file) and ``__row__`` (0-based row within it)
so later errors can name the row. ``load_sources`` normalises each source to the canonical
form of :mod:`megaswift.data.formats` before concatenating.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import datasets
import numpy as np

from megaswift.data.formats import AnyDataset, RowError, normalize_dataset

if TYPE_CHECKING:
    from megaswift.args.data import DataArgs

logger = logging.getLogger("megaswift.data")

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_META_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")

__all__ = ["load_source", "load_sources", "load_train_val", "sample", "split", "parse_spec", "RowError"]


def parse_spec(spec: str) -> tuple[str, Optional[int]]:
    """Split ``path#N`` into (path, N); N is None without a ``#N`` suffix."""
    m = re.fullmatch(r"(.+)#(\d+)", spec)
    return (m.group(1), int(m.group(2))) if m else (spec, None)


def _rename_row(row: dict, columns: dict[str, str]) -> dict:
    """Rename the keys of ``columns`` present in ``row``; a clashing target key is dropped."""
    targets = set(columns.values())
    out = {k: v for k, v in row.items() if k not in columns and k not in targets}
    out.update({columns[k]: v for k, v in row.items() if k in columns})
    return out


def _rename(ds: datasets.Dataset, columns: dict[str, str]) -> datasets.Dataset:
    """Rename the columns of ``columns`` that exist (a clashing target column is dropped first)."""
    present = {k: v for k, v in columns.items() if k in ds.column_names and k != v}
    clash = [v for v in present.values() if v in ds.column_names and v not in present]
    return ds.remove_columns(clash).rename_columns(present) if present else ds


def _bookkeep(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    n = len(ds)
    return ds.add_column("__source__", [source] * n).add_column("__row__", list(range(n)))


def _json_rows(path: Path) -> Iterator[tuple[Optional[int], object, bool]]:
    """Yield (line number or None, parsed object or raw line, parsed ok) for a .json/.jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
            yield from ((None, o, True) for o in (obj if isinstance(obj, list) else [obj]))
            return
        except json.JSONDecodeError:
            pass  # JSON lines in a .json file
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line), True
            except json.JSONDecodeError:
                yield n, line, False


def _json_fallback(path: Path, columns: dict[str, str]) -> datasets.Dataset:
    """Rows of a JSON file that Arrow cannot load (bad lines, mixed types) kept as JSON text.

    formats.normalize decodes ``__json__``; undecodable lines become "invalid JSON" rows there.
    """
    enc, lines = [], []
    for line, obj, ok in _json_rows(path):
        if not ok:
            enc.append(obj)  # invalid JSON line, kept raw
        else:
            enc.append(json.dumps(_rename_row(obj, columns) if isinstance(obj, dict) else obj, ensure_ascii=False))
        lines.append(line)
    return datasets.Dataset.from_dict({"__json__": enc, "__line__": lines, "__source__": [str(path)] * len(enc),
                                       "__row__": list(range(len(enc)))},
                                      features=datasets.Features({"__json__": datasets.Value("string"),
                                                                  "__line__": datasets.Value("int64"),
                                                                  "__source__": datasets.Value("string"),
                                                                  "__row__": datasets.Value("int64")}))


def _load_file(path: Path, columns: dict[str, str]) -> datasets.Dataset:
    builder = SUFFIXES[path.suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    except Exception as e:  # noqa: BLE001 - any loader failure on JSON gets the tolerant path
        if builder != "json":
            raise ValueError(f"could not read {path}: {type(e).__name__}: {e}") from e
        logger.info("%s: fast JSON load failed (%s); reading it row by row", path, type(e).__name__)
        return _json_fallback(path, columns)
    ds = _bookkeep(_rename(ds, columns), str(path))
    if builder == "text":  # a blank line is not a row
        ds = ds.filter(lambda t: [bool(x.strip()) for x in t], input_columns="text", batched=True)
    return ds


def _stream_file_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row index, raw row) pairs of one local file, read lazily."""
    import pandas as pd
    import pyarrow.parquet as pq

    if path.suffix in (".json", ".jsonl"):
        for i, (line, obj, ok) in enumerate(_json_rows(path)):
            if ok and isinstance(obj, dict):
                yield i, obj
            else:  # formats.normalize reports it (invalid JSON / wrong type)
                yield i, {"__json__": obj if not ok else json.dumps(obj), "__line__": line}
    elif path.suffix == ".csv":
        i = 0
        for chunk in pd.read_csv(path, chunksize=1000):
            for row in chunk.astype(object).where(chunk.notna(), None).to_dict("records"):
                yield i, row
                i += 1
    elif path.suffix == ".parquet":
        i = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield i, row
                i += 1
    else:  # .txt: one row per non-blank line, indexed by line
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    yield i, {"text": line.rstrip("\n")}


def _stream_files(files: list[str], columns: dict[str, str]) -> Iterator[dict]:
    """Generator behind streaming local sources: plain dict rows with bookkeeping."""
    for f in files:
        for i, row in _stream_file_rows(Path(f)):
            yield {**_rename_row(row, columns), "__source__": f, "__row__": i}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and p.name not in _META_FILES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"directory {path} holds no data files ({', '.join(sorted(SUFFIXES))})")
    return files


def _from_disk(path: Path) -> datasets.Dataset:
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"{path}: saved DatasetDict has splits {list(ds)}; none is 'train'")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _from_hub(spec: str, streaming: bool) -> AnyDataset:
    name, _, subset = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, subset or None, split="train", streaming=streaming)
    except Exception as e:  # noqa: BLE001 - offline/hub errors come in many types
        raise ValueError(
            f"dataset {spec!r} is not a local path, and it could not be loaded from the Hugging Face hub "
            f"(hub unreachable or offline? {type(e).__name__}: {str(e)[:300]}). Pass a local file "
            f"(.jsonl/.json/.csv/.parquet/.txt), a directory of them or a `save_to_disk` folder instead.") from e
    return ds


def _add_index(row: dict, idx: int, source: str) -> dict:
    return {"__source__": source, "__row__": idx}


def _load_parts(path_str: str, columns: dict[str, str], streaming: bool) -> list[AnyDataset]:
    """One raw dataset per file of a source (already renamed and bookkept)."""
    path = Path(path_str).expanduser()
    if not path.exists():
        if path.suffix in SUFFIXES or path_str.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(path_str):
            raise FileNotFoundError(f"dataset path {path_str!r} does not exist")
        ds = _from_hub(path_str, streaming)
    elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = _from_disk(path)
        ds = ds.to_iterable_dataset() if streaming else ds
    elif streaming:
        files = [str(f) for f in _files(path)]
        return [datasets.IterableDataset.from_generator(_stream_files, gen_kwargs={"files": files, "columns": columns})]
    else:
        return [_load_file(f, columns) for f in _files(path)]
    if isinstance(ds, datasets.IterableDataset):  # hub stream / saved dir as stream
        if ds.column_names is not None:
            ds = ds.rename_columns({k: v for k, v in columns.items() if k in ds.column_names and k != v})
        elif columns:
            ds = ds.map(_rename_row, fn_kwargs={"columns": columns})
        return [ds.map(_add_index, with_indices=True, fn_kwargs={"source": path_str})]
    return [_bookkeep(_rename(ds, columns), path_str)]


def sample(ds: AnyDataset, n: int, seed: int) -> AnyDataset:
    """``#N``: N rows seeded by ``seed``; without replacement when N <= rows, else the whole
    dataset repeated N // rows times plus a random remainder (ms-swift's rule). Streams take the
    first N rows of a seeded buffer shuffle."""
    if isinstance(ds, datasets.IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=max(1000, min(n, 100_000))).take(n)
    if len(ds) == 0:
        raise ValueError(f"cannot sample {n} rows from an empty dataset")
    rng = np.random.RandomState(seed)
    repeat, remain = divmod(n, len(ds))
    idx = np.concatenate([np.tile(np.arange(len(ds)), repeat), rng.permutation(len(ds))[:remain]])
    return ds.select(idx.tolist())


def _concat(parts: list[AnyDataset]) -> Optional[AnyDataset]:
    """Concatenate raw parts; None when their columns do not agree."""
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except (ValueError, TypeError):
        return None


def load_source(spec: str, *, seed: int, columns: Optional[dict[str, str]] = None,
                streaming: bool = False) -> AnyDataset:
    """Load one source's raw rows (renamed by ``columns``, with ``__source__``/``__row__``).

    Rows are not normalised (see :func:`load_sources`); rows of a JSON file that Arrow could not
    load are kept as ``__json__`` text and decoded by normalisation. Raises FileNotFoundError for
    a missing path and ValueError for an unreachable hub id or a directory whose files' columns
    have clashing types (missing columns are fine: the union is taken).
    """
    path, n = parse_spec(spec)
    ds = _concat(_load_parts(path, columns or {}, streaming))
    if ds is None:
        raise ValueError(f"the files of {path} have incompatible columns; load them with load_sources, "
                         "which normalises each file first")
    return sample(ds, n, seed) if n is not None else ds


def load_sources(specs: list[str], *, seed: int, columns: Optional[dict[str, str]] = None,
                 streaming: bool = False, strict: bool = False,
                 num_proc: int = 1) -> tuple[AnyDataset, Counter]:
    """Load, normalise and combine several sources; returns (dataset, dropped-rows Counter).

    Each source is normalised to the canonical form (strict: first bad row raises RowError;
    otherwise bad rows are dropped and counted), then ``#N``-sampled (so N counts usable rows,
    as in ms-swift), then all are concatenated (streams are interleaved until every one is
    exhausted, each row once).
    """
    if not specs:
        raise ValueError("no dataset sources given")
    out, counts = [], Counter()
    for spec in specs:
        path, n = parse_spec(spec)
        parts = _load_parts(path, columns or {}, streaming)
        raw = _concat(parts)
        normed = [normalize_dataset(p, strict=strict, num_proc=num_proc, counts=counts)[0]
                  for p in ([raw] if raw is not None else parts)]
        ds = normed[0] if len(normed) == 1 else datasets.concatenate_datasets(normed)
        if not streaming and len(ds) == 0:
            raise ValueError(f"{spec}: no usable rows (dropped: {dict(counts)})")
        out.append(sample(ds, n, seed) if n is not None else ds)
    if len(out) == 1:
        return out[0], counts
    if streaming:
        strategy = "all_exhausted_without_replacement"  # every row of every stream once
        return datasets.interleave_datasets(out, seed=seed, stopping_strategy=strategy), counts
    return datasets.concatenate_datasets(out), counts


def split(ds: AnyDataset, ratio: float, seed: int) -> tuple[AnyDataset, Optional[AnyDataset]]:
    """Deterministically hold out ``ratio`` of the rows (at least one) for validation."""
    if ratio <= 0:
        return ds, None
    if isinstance(ds, datasets.IterableDataset):
        raise ValueError("--split_dataset_ratio needs a non-streaming dataset; pass --val_dataset instead")
    if len(ds) < 2:
        raise ValueError(f"cannot split {len(ds)} row(s) into train and validation")
    n_val = min(len(ds) - 1, max(1, round(len(ds) * ratio)))
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_train_val(args: "DataArgs") -> tuple[AnyDataset, Optional[AnyDataset]]:
    """(train, val) canonical datasets for DataArgs: --dataset, --val_dataset or --split_dataset_ratio."""
    kw = dict(seed=args.data_seed, columns=args.column_map, streaming=args.streaming, strict=args.strict,
              num_proc=args.dataset_num_proc)
    train, _ = load_sources(args.dataset, **kw)
    if args.val_dataset:
        return train, load_sources(args.val_dataset, **kw)[0]
    return split(train, args.split_dataset_ratio, args.data_seed)
