#!/usr/bin/env bash
# Main job: fine-tune the real SmolLM2-135M-Instruct on LLaMA-Factory's alpaca_en_demo on this
# CPU for a few minutes with megatron-core (padding-free batches, distributed optimizer), export
# the result to HF, plot the loss curve and let transformers answer a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-out/sft-smollm2}
ITERS=${ITERS:-30}
HF=$(python -m megaswift.assets smollm2)
DATA=$(python -m megaswift.assets llamafactory-data)/alpaca_en_demo.json
rm -rf "$OUT"
megatron sft --model "$HF" --dataset "$DATA" --save "$OUT/ckpt" --add_version false \
    --torch_dtype float32 --max_length 512 --micro_batch_size 4 --global_batch_size 8 \
    --train_iters "$ITERS" --lr 1e-4 --min_lr 1e-5 --lr_warmup_iters 3 --save_interval "$ITERS" \
    --split_dataset_ratio 0.02 --eval_interval 10 --eval_iters 4
megatron export --load "$OUT/ckpt" --to_hf true --save "$OUT/hf" --torch_dtype bfloat16
python examples/plot_loss.py "$OUT/ckpt/logging.jsonl" "$OUT/ckpt/loss.png"
python examples/generate.py "$OUT/hf" "Give three tips for staying healthy."
