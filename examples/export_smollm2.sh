#!/usr/bin/env bash
# Main job: fetch the real SmolLM2-135M-Instruct, convert it to Megatron-Core with the precision
# check, convert it back to HF, check the round trip is bitwise and let transformers answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore
OUT=${OUT:-out/smollm2}
HF=$(python -m megaswift.assets smollm2)
rm -rf "$OUT/mcore" "$OUT/hf"
megatron export --model "$HF" --to_mcore true --save "$OUT/mcore" --test_convert_precision true
megatron export --load "$OUT/mcore" --to_hf true --save "$OUT/hf"
python examples/check_export.py "$HF" "$OUT/hf"
