#!/usr/bin/env bash
#SBATCH --job-name=kdscale-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
# Any experiment YAML as a Slurm job (kdscale.train through slurm/launch.sh):
#   sbatch [sbatch flags] slurm/train.sh CONFIG [key.sub=value ...]
#   sbatch --gpus-per-node=8 slurm/train.sh configs/dkd_imagenet.yaml optim.lr=0.2 train.epochs=90
# CONFIG is relative to the repository (KDSCALE_REPO, default: the directory sbatch was run
# from); the overrides after it come after any in KDSCALE_OVERRIDES, so they win. Every
# slurm/<method>_imagenet.sh is this script with configs/<method>_imagenet.yaml and its own
# #SBATCH defaults. Everything else (KDSCALE_OUTPUT, KDSCALE_DEEPSPEED, nodes, GPUs): see
# the header of slurm/launch.sh. Refuses in one line, before anything starts, a missing or
# nonexistent config and an override that is not one word of the form key=value.
set -euo pipefail
usage="sbatch [sbatch flags] slurm/train.sh configs/<name>.yaml [key.sub=value ...]"
if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "kdscale slurm: error: no config given; the first argument is the experiment YAML: $usage" >&2
  exit 2
fi
config=$1
shift
export KDSCALE_REPO=${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$KDSCALE_REPO/slurm/launch.sh" ]; then
  echo "kdscale slurm: error: no kdscale repository at $KDSCALE_REPO (slurm/launch.sh missing);" \
       "submit from the repository or set KDSCALE_REPO" >&2
  exit 2
fi
cd "$KDSCALE_REPO"
if [ ! -f "$config" ]; then
  echo "kdscale slurm: error: config file not found: $config (relative to $KDSCALE_REPO on $(hostname -s));" \
       "give an existing experiment YAML (ls configs/*_imagenet.yaml), put the repository on a filesystem" \
       "every node sees, or set KDSCALE_REPO" >&2
  exit 2
fi
for override in "$@"; do
  if [[ "$override" != *=* || "$override" =~ [[:space:]] ]]; then
    echo "kdscale slurm: error: override '$override' must be one word of the form key.sub=value" \
         "(e.g. optim.lr=0.2): $usage" >&2
    exit 2
  fi
done
export KDSCALE_CONFIG=$config
if [ $# -gt 0 ]; then
  export KDSCALE_OVERRIDES="${KDSCALE_OVERRIDES:-}${KDSCALE_OVERRIDES:+ }$*"
fi
# exec: the batch shell that Slurm signals (--signal=B:USR1) stays one process, launch.sh's.
exec bash "$KDSCALE_REPO/slurm/launch.sh" train
