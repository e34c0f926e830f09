"""Benchmark LoRA DPO against LoRA SFT on SmolLM2-135M-Instruct, same rows, same steps.

SFT trains on the chosen answers of LLaMA-Factory's dpo_en_demo; DPO on the same rows' pairs
(chosen and rejected, plus the reference pass: the policy with its adapters off, no model copy).
Printed per run: s/it (median after the first step), peak RSS of the training process, trainable
parameters. Target: DPO's peak RSS within 10% of SFT's plus the second sequence's activations
(DPO holds no second copy of the model).

    python bench/dpo_bench.py [--steps 6] [--batch 2] [--max_length 768]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_bench import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=768)
    a = ap.parse_args()
    from megaswift.assets import fetch_llamafactory_data, fetch_smollm2

    hf = str(fetch_smollm2())
    data = str(fetch_llamafactory_data() / "dpo_en_demo.json")
    lora = ["--train_type", "lora", "--lora_dropout", "0", "--train_dataloader_shuffle", "false"]
    with tempfile.TemporaryDirectory() as tmp:
        sft = run("sft", hf, data, Path(tmp), a.steps, a.batch, a.max_length, lora)
        dpo = run("dpo", hf, data, Path(tmp), a.steps, a.batch, a.max_length, lora, command="rlhf")
    for r in (sft, dpo):
        print(json.dumps(r))
    print(f"baseline (LoRA SFT on the chosen answers, same run): {sft['s_per_it']} s/it, peak RSS {sft['peak_rss_gib']} GiB")
    print(f"LoRA DPO: {dpo['s_per_it']} s/it ({dpo['s_per_it'] / sft['s_per_it']:.2f}x), peak RSS {dpo['peak_rss_gib']} GiB "
          f"({dpo['peak_rss_gib'] / sft['peak_rss_gib']:.2f}x); both have {dpo['trainable_params']:,} trainable")


if __name__ == "__main__":
    main()
