#!/usr/bin/env bash
# LoRA on the real SmolLM2-135M-Instruct: alpaca_en_demo at TP=3 on three gloo ranks (adapters on
# every linear, Megatron-SWIFT's defaults), evaluation loss before/after, export as a PEFT adapter
# folder, and transformers + peft answer a prompt with it. Then the same adapters merged into a
# plain HF model.
# (SmolLM2 has 9 attention heads and 3 KV heads: TP must divide 3, so TP=3, not TP=2.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-out/lora-smollm2}
ITERS=${ITERS:-30}
HF=$(python -m megaswift.assets smollm2)
DATA=$(python -m megaswift.assets llamafactory-data)/alpaca_en_demo.json
rm -rf "$OUT"
NPROC_PER_NODE=3 megatron sft --model "$HF" --dataset "$DATA" --save "$OUT/ckpt" --add_version false \
    --train_type lora --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --tensor_model_parallel_size 3 --sequence_parallel true \
    --torch_dtype float32 --max_length 512 --micro_batch_size 4 --global_batch_size 8 \
    --train_iters "$ITERS" --lr 2e-4 --min_lr 2e-5 --lr_warmup_iters 3 --save_interval "$ITERS" \
    --split_dataset_ratio 0.02 --eval_interval $((ITERS / 3)) --eval_iters 4
python - "$OUT/ckpt/logging.jsonl" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "eval_loss" in r]
print("eval loss by iteration:", {r["iteration"]: round(r["eval_loss"], 4) for r in evals})
assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], "eval loss did not fall"
PY
megatron export --model "$HF" --adapter_load "$OUT/ckpt" --to_hf true --merge_lora false --save "$OUT/peft"
ls -l "$OUT/peft"
python examples/generate.py "$OUT/peft" "Give three tips for staying healthy."
megatron export --model "$HF" --adapter_load "$OUT/ckpt" --to_hf true --merge_lora true --save "$OUT/merged" \
    --test_convert_precision true
python examples/generate.py "$OUT/merged" "Give three tips for staying healthy."
