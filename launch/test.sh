#!/usr/bin/env bash
# Set up (as launch/demo.sh does) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/setup-slurm.sh
export WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
