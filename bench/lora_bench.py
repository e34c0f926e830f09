"""Benchmark LoRA against full fine-tuning on SmolLM2-135M-Instruct, same batches, same steps.

Both runs are `megatron sft` on the same rows of alpaca_en_demo (same seed, float32, 2 threads,
one process); LoRA uses Megatron-SWIFT's defaults (r 8, alpha 32, all-linear). Printed per run:
seconds per iteration (median over the steps after the first), peak RSS of the training process,
bytes of the last checkpoint on disk, trainable parameters. Targets: LoRA's peak RSS below full's,
and its checkpoint under 5% of full's bytes.

    python bench/lora_bench.py [--steps 8] [--batch 4] [--max_length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs one command and prints the peak RSS (KiB) of its process tree's largest waited child.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)")


def run(name: str, hf: str, data: str, work: Path, steps: int, batch: int, max_length: int, extra: list[str],
        command: str = "sft") -> dict:
    """One `megatron <command>` run in its own process: s/it, peak RSS, checkpoint bytes, trainable parameters."""
    save = work / name
    cmd = [sys.executable, "-c", _PEAK, sys.executable, "-m", "megaswift.cli", command, "--model", hf,
           "--dataset", f"{data}#{steps * batch}", "--save", str(save), "--add_version", "false",
           "--torch_dtype", "float32", "--max_length", str(max_length), "--micro_batch_size", str(batch),
           "--global_batch_size", str(batch), "--train_iters", str(steps), "--lr_warmup_iters", "0", *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB")))
    records = [json.loads(line) for line in (save / "logging.jsonl").read_text().splitlines()]
    step_times = [r["seconds_per_iteration"] for r in records if "loss" in r][1:]
    ckpt = save / f"iter_{steps:07d}"
    return {
        "run": name,
        "s_per_it": round(statistics.median(step_times), 3),
        "peak_rss_gib": round(peak / 2**20, 3),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
        "trainable_params": next(r["trainable_params"] for r in records if "trainable_params" in r),
        "final_loss": round([r["loss"] for r in records if "loss" in r][-1], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=512)
    a = ap.parse_args()
    from megaswift.assets import fetch_llamafactory_data, fetch_smollm2

    hf = str(fetch_smollm2())
    data = str(fetch_llamafactory_data() / "alpaca_en_demo.json")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        full = run("full", hf, data, work, a.steps, a.batch, a.max_length, ["--lr", "1e-5"])
        lora = run("lora", hf, data, work, a.steps, a.batch, a.max_length, ["--train_type", "lora"])
    for r in (full, lora):
        print(json.dumps(r))
    ratio = lora["checkpoint_bytes"] / full["checkpoint_bytes"]
    print(f"baseline (full fine-tuning, same run): {full['s_per_it']} s/it, peak RSS {full['peak_rss_gib']} GiB, "
          f"checkpoint {full['checkpoint_bytes'] / 2**20:.1f} MiB, {full['trainable_params']:,} trainable")
    print(f"LoRA: {lora['s_per_it']} s/it ({full['s_per_it'] / lora['s_per_it']:.2f}x), peak RSS "
          f"{lora['peak_rss_gib']} GiB ({lora['peak_rss_gib'] / full['peak_rss_gib']:.2f}x), checkpoint "
          f"{lora['checkpoint_bytes'] / 2**20:.2f} MiB ({100 * ratio:.2f}% of full), {lora['trainable_params']:,} trainable")
    met = lora["peak_rss_gib"] < full["peak_rss_gib"] and ratio < 0.05
    print("targets (less memory than full, checkpoint < 5% of full):", "met" if met else "NOT met")


if __name__ == "__main__":
    main()
