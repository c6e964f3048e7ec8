#!/usr/bin/env bash
# The whole GPU check as one prepared command (kdscale/bench/gpu_check.py): correctness tests
# on the device (pytest -m gpu), then kdscale bench's GPU figures (compute, teachers2, compile,
# decode, writer, crd), then one report in OUT_DIR (default runs/gpu-check: gpu-check.json,
# gpu-check.md), in about 8 minutes on one GPU (part budgets: correctness 200 s, figures 280 s).
#   bash launch/gpu-check.sh [OUT_DIR]            on a machine with CUDA
#   bash launch/gpu-check.sh --dry-run [OUT_DIR]  the same parts on the CPU at tiny sizes (CI runs this)
# Installs nothing beyond launch/setup.sh; needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_SILENT=true
exec .venv/bin/python -m kdscale.bench.gpu_check "$@"
