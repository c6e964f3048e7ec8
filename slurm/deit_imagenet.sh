#!/usr/bin/env bash
#SBATCH --job-name=kdscale-deit-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
# DeiT on ImageNet (configs/deit_imagenet.yaml). GPUs: sbatch --gpus-per-node=8 slurm/deit_imagenet.sh
# (or export SBATCH_GPUS_PER_NODE=8). Overrides without editing: sbatch slurm/deit_imagenet.sh optim.lr=5.0e-4,
# or KDSCALE_OVERRIDES="optim.lr=5.0e-4"; KDSCALE_OUTPUT, KDSCALE_DEEPSPEED=zero2, sbatch -N 4 ...
# The generic slurm/train.sh does the work (see it and slurm/launch.sh); KDSCALE_CONFIG picks another YAML.
exec bash "${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train.sh" "${KDSCALE_CONFIG:-configs/deit_imagenet.yaml}" "$@"
