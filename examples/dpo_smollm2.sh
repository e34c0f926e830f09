#!/usr/bin/env bash
# LoRA DPO on the real SmolLM2-135M-Instruct with LLaMA-Factory's dpo_en_demo, a few minutes on
# CPU: the reference is the policy with its adapters off (no second copy). Prints the first and
# last rewards/margins and rewards/accuracies, then exports the adapters as a PEFT folder and as a
# merged HF model, and lets transformers + peft answer a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-out/dpo-smollm2}
ITERS=${ITERS:-20}
HF=$(python -m megaswift.assets smollm2)
DATA=$(python -m megaswift.assets llamafactory-data)/dpo_en_demo.json
rm -rf "$OUT"
megatron rlhf --rlhf_type dpo --model "$HF" --dataset "$DATA" --save "$OUT/ckpt" --add_version false \
    --train_type lora --lora_rank 16 --lora_alpha 32 --beta 0.1 --loss_type sigmoid \
    --torch_dtype float32 --max_length ${MAX_LENGTH:-512} --micro_batch_size 2 --global_batch_size 4 \
    --train_iters "$ITERS" --lr 5e-4 --lr_warmup_iters 2 --save_interval "$ITERS" --log_interval 1
python - "$OUT/ckpt/logging.jsonl" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "rewards/margins" in r]
k = max(1, len(rows) // 4)
for key in ("rewards/margins", "rewards/accuracies", "loss"):
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    print(f"{key}: first {k} iterations {first:.4f} -> last {k} iterations {last:.4f}")
PY
megatron export --model "$HF" --adapter_load "$OUT/ckpt" --to_hf true --merge_lora false --save "$OUT/peft"
megatron export --model "$HF" --adapter_load "$OUT/ckpt" --to_hf true --merge_lora true --save "$OUT/merged"
python examples/generate.py "$OUT/peft" "Give three tips for staying healthy."
