"""Benchmark the data path on alpaca_en_demo.json (999 rows) with the SmolLM2 tokenizer.

(a) Tokenisation throughput, rows/s, best of `--repeats`, for each `--num_proc`:
    megaswift: `build_datasets(DataArgs(dataset=[path], dataset_num_proc=N), tokenizer)`, which
      loads the JSON, normalises rows, renders the chat template and builds assistant-only labels.
    baseline (measured in the same run, same process, same num_proc): `load_dataset("json")` +
      `.map(apply_chat_template(..., tokenize=True))` giving input_ids only (no labels, no checks).
    Both include loading the JSON; the datasets cache is disabled for map results (both reuse the
    JSON builder's Arrow cache after the first load, hence best of several runs).
(b) Padding share of micro-batches of megaswift's samples in dataset order, per
    `--micro_batch_size`: padded `[b, s]` batches vs padding-free THD batches (pad to a multiple
    of 1, and of 2 as TP=2 + sequence parallel needs), plus `--packing` rows (2048 tokens,
    padding-free, micro-batch 1). Share = padding tokens / computed tokens.

    python bench/data_bench.py [--num_proc 1 2] [--micro_batch_size 4 8 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

PACKING_LENGTH = 2048


def user_text(row: dict) -> str:
    return row["instruction"] + ("\n" + row["input"] if row["input"] else "")


def baseline(path: str, tokenizer, num_proc: int):
    """The plain recipe: load the JSON and map apply_chat_template over it."""
    import datasets

    def encode(row):
        msgs = [{"role": "user", "content": user_text(row)}, {"role": "assistant", "content": row["output"]}]
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return {"input_ids": ids}

    ds = datasets.load_dataset("json", data_files=path)["train"]
    return ds.map(encode, num_proc=num_proc, remove_columns=ds.column_names)


def megaswift_build(path: str, tokenizer, num_proc: int, **kw):
    from megaswift.args.data import DataArgs
    from megaswift.data.pipeline import build_datasets

    return build_datasets(DataArgs(dataset=[path], dataset_num_proc=num_proc, **kw), tokenizer)


def best_time(fn, repeats: int):
    """(best seconds, last result) of `repeats` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def padding(samples: list[dict], mbs: int, collate, pad_id: int, multiple: int) -> tuple[int, int]:
    """(real, padding) tokens over all micro-batches of `mbs` samples, in order."""
    real = pad = 0
    for i in range(0, len(samples), mbs):
        b = collate(samples[i:i + mbs], pad_id=pad_id, multiple=multiple)
        real, pad = real + b.num_real_tokens, pad + b.num_padded_tokens
    return real, pad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_proc", type=int, nargs="+", default=[1, 2], help="tokenisation processes")
    ap.add_argument("--micro_batch_size", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--repeats", type=int, default=2, help="runs per case; the best is reported")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import datasets
    from transformers import AutoTokenizer

    from megaswift.assets import fetch_llamafactory_data, fetch_smollm2
    from megaswift.data.collate import collate_padded, collate_padding_free

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(fetch_smollm2()))
    path = str(fetch_llamafactory_data() / "alpaca_en_demo.json")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # (a) throughput
    print(f"(a) tokenisation of alpaca_en_demo.json, SmolLM2 tokenizer, {os.cpu_count()} CPUs, "
          f"best of {args.repeats} (JSON load included)")
    print(f"{'num_proc':>8s} {'baseline rows/s':>16s} {'megaswift rows/s':>17s} {'megaswift/baseline':>19s}")
    train = None
    for n in args.num_proc:
        t_base, base = best_time(lambda: baseline(path, tokenizer, n), args.repeats)
        t_ms, (train, _, stats) = best_time(lambda: megaswift_build(path, tokenizer, n), args.repeats)
        r_base, r_ms = len(base) / t_base, stats.rows / t_ms
        print(f"{n:8d} {r_base:16.0f} {r_ms:17.0f} {r_ms / r_base:18.2f}x")
    print(f"rows: baseline {len(base)}, megaswift {stats.rows} kept (dropped {stats.dropped or 'none'}); "
          f"tokens: baseline {sum(map(len, base['input_ids']))}, megaswift {stats.tokens} "
          f"({stats.trained_tokens} trained)")

    # (b) padding share
    samples = train.select_columns(["input_ids", "labels"]).to_list()
    packed_ds, _, pstats = megaswift_build(path, tokenizer, 1, packing=True, packing_length=PACKING_LENGTH)
    packed = packed_ds.to_list()
    cases = []
    for mbs in args.micro_batch_size:
        cases += [("padded", mbs, samples, collate_padded, 1),
                  ("padding-free", mbs, samples, collate_padding_free, 1),
                  ("padding-free, multiple 2 (TP2+SP)", mbs, samples, collate_padding_free, 2)]
    cases += [(f"packed {PACKING_LENGTH} + padding-free", 1, packed, collate_padding_free, 1),
              (f"packed {PACKING_LENGTH} + padding-free, multiple 2", 1, packed, collate_padding_free, 2)]
    print(f"\n(b) padding share, {len(samples)} samples in dataset order "
          f"({len(packed)} packed rows of <= {PACKING_LENGTH} tokens)")
    print(f"{'batcher':40s} {'mbs':>4s} {'real tokens':>12s} {'padding tokens':>15s} {'padding %':>10s}")
    for name, mbs, rows, collate, multiple in cases:
        real, pad = padding(rows, mbs, collate, pad_id, multiple)
        print(f"{name:40s} {mbs:4d} {real:12d} {pad:15d} {100 * pad / (real + pad):9.2f}%")
    print(f"packing fill (real tokens / {len(packed)} x {PACKING_LENGTH} capacity): "
          f"{100 * pstats.packing_efficiency:.2f}% (what a fixed-shape packed batch would compute)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
