"""Load raw rows from dataset sources (files, directories, saved datasets, hub ids) with HF ``datasets``.

A source spec is a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.txt`` file, a directory
of such files (all of them, sorted, recursively), a ``Dataset.save_to_disk`` directory or a hub
id ``org/name`` (optionally ``org/name:subset``). A ``#N`` suffix samples N rows (seeded;
when N exceeds the rows, the whole dataset is repeated and the remainder sampled, as ms-swift;
in order with ``--dataset_shuffle false``, and always in order for streams).

A file with no rows is an error naming it (skipped with a warning inside a directory). JSON
input that Arrow cannot load as a table (bad lines, bytes that are not UTF-8, an array of
non-objects such as ``[1, 2]``) is read row by row: each bad row becomes a counted "invalid
JSON" / "invalid UTF-8" / "wrong type" row (an error naming file, row and line with
``--strict true``) instead of failing the file or being taken as text.

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

from megaswift.data.formats import AnyDataset, RowError, SelfCognition, normalize_dataset

if TYPE_CHECKING:
    from megaswift.args.data import DataArgs

logger = logging.getLogger("megaswift.data")

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_META_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")

__all__ = ["load_source", "load_sources", "load_train_val", "sample", "split", "parse_spec", "drop_summary",
           "RowError"]


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


def _utf8_error(e: UnicodeDecodeError) -> tuple[str, str]:
    return "invalid UTF-8", f"byte 0x{e.object[e.start]:02x} at column {e.start + 1}"


def _has_bad_utf8(obj: object) -> bool:
    """True when text decoded with ``surrogateescape`` kept undecodable bytes somewhere in ``obj``."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _json_rows(path: Path) -> Iterator[tuple[Optional[int], object, Optional[tuple[str, str]]]]:
    """Yield (line number or None, parsed object or raw line, None or (reason, detail)) for a
    .json/.jsonl file. A .json file holding one JSON document (array or object) is parsed whole;
    anything else is read as JSON lines, one at a time. Bytes that are not UTF-8 make their row
    (line, or array element) an "invalid UTF-8" row instead of failing the file.
    """
    if path.suffix == ".json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="surrogateescape")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSON lines in a .json file
        else:
            for o in (obj if isinstance(obj, list) else [obj]):
                if _has_bad_utf8(o):
                    yield None, None, ("invalid UTF-8", "the row holds bytes that are not UTF-8")
                else:
                    yield None, o, None
            return
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield n, None, _utf8_error(e)
                continue
            if line.strip():
                try:
                    yield n, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield n, line.rstrip("\r\n"), ("invalid JSON", e.msg)


def _bad_row(obj: object, line: Optional[int], error: Optional[tuple[str, str]]) -> dict:
    """A row that normalisation will reject (or decode): kept as JSON text or an error."""
    if error is not None:
        return {"__json__": None, "__line__": line, "__error__": json.dumps(list(error))}
    return {"__json__": json.dumps(obj, ensure_ascii=False), "__line__": line, "__error__": None}


def _json_fallback(path: Path, columns: dict[str, str]) -> datasets.Dataset:
    """Rows of a JSON file that Arrow cannot load (bad lines, mixed types, non-objects, bytes that
    are not UTF-8) kept as JSON text, or as an ``__error__`` (reason, detail) for the rows that
    could not be parsed. formats.normalize decodes ``__json__`` and reports ``__error__``.
    """
    enc, lines, errors = [], [], []
    for line, obj, error in _json_rows(path):
        row = _bad_row(_rename_row(obj, columns) if isinstance(obj, dict) else obj, line, error)
        enc.append(row["__json__"])
        errors.append(row["__error__"])
        lines.append(line)
    return datasets.Dataset.from_dict({"__json__": enc, "__line__": lines, "__error__": errors,
                                       "__source__": [str(path)] * len(enc), "__row__": list(range(len(enc)))},
                                      features=datasets.Features({"__json__": datasets.Value("string"),
                                                                  "__line__": datasets.Value("int64"),
                                                                  "__error__": datasets.Value("string"),
                                                                  "__source__": datasets.Value("string"),
                                                                  "__row__": datasets.Value("int64")}))


def _json_array_of_non_objects(path: Path) -> bool:
    """A .json file whose top-level array starts with something other than an object.

    Arrow would load ``[1, 2]`` or ``["a", "b"]`` as a ``text`` column, i.e. as pretraining
    text; such rows must be refused as "wrong type" instead (the tolerant path does that).
    """
    if path.suffix != ".json":
        return False
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return False
    rest = head[1:].lstrip(b" \t\r\n")
    return bool(rest) and rest[:1] not in (b"{", b"]")


def _first_bad_utf8(path: Path) -> Optional[tuple[int, str]]:
    """(line number, detail) of the first bytes of a text file that are not UTF-8, or None.

    Arrow's JSON and CSV readers do not validate UTF-8: the bad bytes would surface later as an
    exception far from the file. One pass of an incremental decoder finds them up front.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            try:
                decoder.decode(chunk, final=len(chunk) < 1 << 24)
            except UnicodeDecodeError as e:
                data, bad = e.object, e.start  # data: a partial character left from the last chunk + chunk
                column = bad - data.rfind(b"\n", 0, bad)
                return lines + data.count(b"\n", 0, bad), f"byte 0x{data[bad]:02x} at column {column}"
            lines += chunk.count(b"\n")
    return None


def _is_empty(path: Path) -> bool:
    """True when a data file holds no rows at all (empty, blank, ``[]``, a CSV header only)."""
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # noqa: BLE001 - not a parquet file: the loader says so
            return False
    if size > 1 << 20:
        return False
    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    if path.suffix == ".csv":
        return len(text.splitlines()) <= 1  # nothing, or a header without rows
    return text in ("", "[]")


def _load_file(path: Path, columns: dict[str, str]) -> datasets.Dataset:
    builder = SUFFIXES[path.suffix]
    bad = None if builder == "parquet" else _first_bad_utf8(path)
    if bad is not None and builder != "json":
        raise ValueError(f"{path} line {bad[0]}: invalid UTF-8 ({bad[1]}); save the file as UTF-8")
    if builder == "json" and (bad is not None or _json_array_of_non_objects(path)):
        logger.info("%s: %s; reading it row by row", path,
                    "not all of it is UTF-8" if bad is not None else "an array of non-objects")
        return _json_fallback(path, columns)
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
        for i, (line, obj, error) in enumerate(_json_rows(path)):
            if error is None and isinstance(obj, dict):
                yield i, obj
            else:  # formats.normalize reports it (invalid JSON / UTF-8, wrong type)
                yield i, _bad_row(obj, line, error)
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


def _non_empty(path: Path, files: list[Path]) -> list[Path]:
    """The files of a source that hold rows; an empty file given by name is an error, empty files
    in a directory are skipped with a warning (all of them empty: an error)."""
    empty = [f for f in files if _is_empty(f)]
    if not empty:
        return files
    if path.is_file():
        raise ValueError(f"dataset file {path} has no rows (it is empty)")
    if len(empty) == len(files):
        raise ValueError(f"dataset directory {path} has no rows: all {len(files)} data files in it are empty")
    for f in empty:
        logger.warning("%s: the file is empty; skipped", f)
    return [f for f in files if f not in empty]


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
        files = [str(f) for f in _non_empty(path, _files(path))]
        return [datasets.IterableDataset.from_generator(_stream_files, gen_kwargs={"files": files, "columns": columns})]
    else:
        return [_load_file(f, columns) for f in _non_empty(path, _files(path))]
    if isinstance(ds, datasets.IterableDataset):  # hub stream / saved dir as stream
        if ds.column_names is not None:
            ds = ds.rename_columns({k: v for k, v in columns.items() if k in ds.column_names and k != v})
        elif columns:
            ds = ds.map(_rename_row, fn_kwargs={"columns": columns})
        return [ds.map(_add_index, with_indices=True, fn_kwargs={"source": path_str})]
    return [_bookkeep(_rename(ds, columns), path_str)]


def sample(ds: AnyDataset, n: int, seed: int, shuffle: bool = True) -> AnyDataset:
    """``#N``: N rows seeded by ``seed``; without replacement when N <= rows, else the whole
    dataset repeated N // rows times plus a random remainder (ms-swift's rule). ``shuffle=False``
    (``--dataset_shuffle false``) takes the rows in order instead: the first N, or the dataset
    repeated and then its first rows. Streams are sampled in order, as in ms-swift: their first
    N rows (a stream with fewer rows gives them all once)."""
    if isinstance(ds, datasets.IterableDataset):
        return ds.take(n)
    if len(ds) == 0:
        raise ValueError(f"cannot sample {n} rows from an empty dataset")
    repeat, remain = divmod(n, len(ds))
    rest = np.random.RandomState(seed).permutation(len(ds))[:remain] if shuffle else np.arange(remain)
    idx = np.concatenate([np.tile(np.arange(len(ds)), repeat), rest])
    return ds.select(idx.tolist())


def drop_summary(dropped: dict, total: int, max_length: Optional[int] = None,
                 truncation_strategy: Optional[str] = None) -> str:
    """'--max_length 256 drops 40/40 rows as too long; 2/40 rows dropped as wrong type'."""
    parts = []
    for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        if reason == "too long":
            parts.append(f"--max_length {max_length} drops {n}/{total} rows as too long "
                         f"(--truncation_strategy {truncation_strategy or 'delete'})")
        elif reason == "no trained tokens":
            parts.append(f"{n}/{total} rows have no trained tokens left"
                         + (f" after --truncation_strategy {truncation_strategy} to --max_length {max_length}"
                            if max_length and truncation_strategy != "delete" else ""))
        else:
            parts.append(f"{n}/{total} rows dropped as {reason}")
    return "; ".join(parts) or f"{total} rows read"


def _concat(parts: list[AnyDataset]) -> Optional[AnyDataset]:
    """Concatenate raw parts; None when their columns do not agree."""
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except (ValueError, TypeError):
        return None


def load_source(spec: str, *, seed: int, columns: Optional[dict[str, str]] = None,
                streaming: bool = False, shuffle: bool = True) -> AnyDataset:
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
    return sample(ds, n, seed, shuffle) if n is not None else ds


def load_sources(specs: list[str], *, seed: int, columns: Optional[dict[str, str]] = None,
                 streaming: bool = False, strict: bool = False, num_proc: int = 1,
                 shuffle: bool = True, self_cognition: Optional[SelfCognition] = None) -> tuple[AnyDataset, Counter]:
    """Load, normalise and combine several sources; returns (dataset, dropped-rows Counter).

    ``self_cognition`` (``--model_name``/``--model_author``) fills the ``{{NAME}}``/``{{AUTHOR}}``
    placeholders of rows by their ``tag`` column; a placeholder it has no value for is a
    PlaceholderError naming the flag and the file (when normalised: now, or as a stream is read).

    Each source is normalised to the canonical form (strict: first bad row raises RowError;
    otherwise bad rows are dropped and counted), then ``#N``-sampled (so N counts usable rows,
    as in ms-swift; ``shuffle=False`` takes them in order), then all are concatenated (streams
    are interleaved until every one is exhausted, each row once). A source with no usable rows
    is a ValueError naming it and the reasons its rows were dropped.
    """
    if not specs:
        raise ValueError("no dataset sources given")
    out, counts = [], Counter()
    for spec in specs:
        path, n = parse_spec(spec)
        parts = _load_parts(path, columns or {}, streaming)
        raw = _concat(parts)
        # streams count their dropped rows while they are read: into the shared Counter
        mine = counts if streaming else Counter()
        normed = [normalize_dataset(p, strict=strict, num_proc=num_proc, counts=mine,
                                    self_cognition=self_cognition)[0]
                  for p in ([raw] if raw is not None else parts)]
        ds = normed[0] if len(normed) == 1 else datasets.concatenate_datasets(normed)
        if not streaming:
            counts.update(mine)
            if len(ds) == 0:
                raise ValueError(f"{spec}: no usable rows: {drop_summary(mine, sum(mine.values()))}")
        out.append(sample(ds, n, seed, shuffle) if n is not None else ds)
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
              num_proc=args.dataset_num_proc, shuffle=args.dataset_shuffle,
              self_cognition=SelfCognition(args.model_name, args.model_author))
    train, _ = load_sources(args.dataset, **kw)
    if args.val_dataset:
        return train, load_sources(args.val_dataset, **kw)[0]
    return split(train, args.split_dataset_ratio, args.data_seed)
