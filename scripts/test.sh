#!/usr/bin/env bash
# Install what the tests need, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -p no:cacheprovider --durations=25 "$@"
