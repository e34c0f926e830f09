"""Benchmark `megatron sft` against a plain transformers `Trainer` fine-tune, same run, same work.

Same model (SmolLM2-135M-Instruct, float32), same samples (the first rows of alpaca_en_demo,
tokenised once by megaswift's template so both see identical tokens and labels), same batch
(4 samples/step), same number of steps, 2 threads. Throughput counts real (non-padding) tokens
only, over the steps after the first (warm-up). Goal: megaswift >= 1.3x the Trainer.

    python bench/train_bench.py [--steps 12] [--batch 4] [--max_length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def samples(tokenizer, data: Path, n: int, max_length: int) -> list[dict]:
    from megaswift.args.data import DataArgs
    from megaswift.data.pipeline import build_datasets

    train, _, _ = build_datasets(DataArgs(dataset=[f"{data}"], max_length=max_length), tokenizer)
    return [train[i] for i in range(n)]


def bench_megaswift(hf: Path, rows: list[dict], steps: int, batch: int, work: Path) -> float:
    cached = work / "cached"  # the exact samples, as a cached dataset
    from datasets import Dataset

    cached.mkdir()
    Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"], "length": len(r["input_ids"])}
                       for r in rows]).save_to_disk(str(cached / "train"))
    (cached / "stats.json").write_text("{}")
    save = work / "mg"
    cmd = [sys.executable, "-m", "megaswift.cli", "sft", "--model", str(hf), "--cached_dataset", str(cached),
           "--save", str(save), "--add_version", "false", "--torch_dtype", "float32", "--train_iters", str(steps),
           "--global_batch_size", str(batch), "--micro_batch_size", str(batch), "--lr", "1e-5",
           "--save_interval", str(10**9)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (save / "logging.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r][1:]
    tokens = sum(r["tokens_per_second"] * r["seconds_per_iteration"] for r in recs)
    return tokens / sum(r["seconds_per_iteration"] for r in recs)


def bench_trainer(hf: Path, rows: list[dict], steps: int, batch: int, pad_id: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)

    def collate(batch_rows):
        s = max(len(r["input_ids"]) for r in batch_rows)
        ids = torch.full((len(batch_rows), s), pad_id)
        labels = torch.full((len(batch_rows), s), -100)
        mask = torch.zeros((len(batch_rows), s), dtype=torch.long)
        for i, r in enumerate(batch_rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    out = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-5, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Timer()])
    trainer.train()
    real = [sum(len(r["input_ids"]) for r in rows[i * batch:(i + 1) * batch]) for i in range(steps)]
    padded = [batch * max(len(r["input_ids"]) for r in rows[i * batch:(i + 1) * batch]) for i in range(steps)]
    share = 1 - sum(real) / sum(padded)
    return sum(real[1:]) / sum(times[1:]), share


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from megaswift.assets import fetch_llamafactory_data, fetch_smollm2

    hf = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(hf)
    rows = samples(tok, fetch_llamafactory_data() / "alpaca_en_demo.json", args.steps * args.batch, args.max_length)
    with tempfile.TemporaryDirectory() as work:
        mg = bench_megaswift(hf, rows, args.steps, args.batch, Path(work))
    hf_tps, pad_share = bench_trainer(hf, rows, args.steps, args.batch, tok.pad_token_id or 0)
    print(f"SmolLM2-135M fp32, {args.steps} steps x {args.batch} samples (<= {args.max_length} tokens), 2 threads")
    print(f"transformers Trainer (padded, {100 * pad_share:.1f}% padding): {hf_tps:8.1f} real tokens/s")
    print(f"megatron sft (padding-free THD)                : {mg:8.1f} real tokens/s")
    print(f"ratio: {mg / hf_tps:.2f}x (goal >= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
