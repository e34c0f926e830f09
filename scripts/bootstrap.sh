#!/usr/bin/env bash
# Create .venv (if missing) and install megaswift with its test extras, on a CPU machine.
# torch is installed first from the pinned CPU build, so nothing pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import megaswift, megatron.core, transformers, gguf, pytest, matplotlib, accelerate" 2>/dev/null \
   || [ "${MEGASWIFT_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c scripts/constraints.txt "torch==2.13.0"
  python -m pip install -q -c scripts/constraints.txt -e ".[test]"
fi
python -c "import torch, megatron.core, transformers; print(f'torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}')"
