#!/usr/bin/env bash
#SBATCH --job-name=kdscale-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%A_%a.out
# One run of a `kdscale sweep` grid per array task; `kdscale sweep --slurm` submits it as
#   sbatch --array=0-<N-1> slurm/sweep.sh <output_dir>/<name>.sweep.tsv
# Each task is a normal kdscale job (slurm/launch.sh): preemption checkpoints and requeues
# that task alone. More nodes or GPUs per run: kdscale sweep --slurm --sbatch=-N2 ...
set -euo pipefail
grid=${1:?kdscale sweep: give the grid file written by kdscale sweep}
task=${SLURM_ARRAY_TASK_ID:?kdscale sweep: submit with sbatch --array (kdscale sweep --slurm does)}
line=$(sed -n "$((task + 1))p" "$grid")
if [ -z "$line" ]; then
  echo "kdscale sweep: error: $grid has no line $((task + 1)) for array task $task" >&2
  exit 2
fi
IFS=$'\t' read -r config overrides _run_dir <<< "$line"
export KDSCALE_CONFIG=$config
export KDSCALE_OVERRIDES="$overrides ${KDSCALE_OVERRIDES:-}"
exec bash "${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh" train
