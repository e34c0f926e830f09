#!/usr/bin/env bash
# Install what the tests need, then run the suite on CPU.
#   bash scripts/test.sh           the CI tier: every feature, one parity layout per parallelism (~30 min on 2 cores)
#   bash scripts/test.sh --full    also the tests marked `slow`: the whole layout matrix (~80 min on 2 cores)
# Further arguments go to pytest (e.g. tests/test_moe.py -k ep2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
select=(-m "not slow")
if [ "${1:-}" = "--full" ]; then
  shift
  select=()
fi
python -m pytest -q -p no:cacheprovider --durations=25 "${select[@]}" "$@"
