#!/usr/bin/env bash
# Set up (as launch/demo.sh does) and run the whole test suite (--quick: the quick tier, under
# 2 minutes). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/setup-slurm.sh
export WANDB_SILENT=true
if [ "${1:-}" = "--quick" ]; then  # the quick tier: everything but the real multi-process runs
  shift
  set -- -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
