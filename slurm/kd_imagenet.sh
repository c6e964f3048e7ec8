#!/usr/bin/env bash
#SBATCH --job-name=kdscale-kd-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
# KD on ImageNet (configs/kd_imagenet.yaml). GPUs: sbatch --gpus-per-node=8 slurm/kd_imagenet.sh
# (or export SBATCH_GPUS_PER_NODE=8). Overrides without editing: sbatch slurm/kd_imagenet.sh optim.lr=0.2,
# or KDSCALE_OVERRIDES="optim.lr=0.2"; KDSCALE_OUTPUT, KDSCALE_DEEPSPEED=zero2, sbatch -N 4 ...
# The generic slurm/train.sh does the work (see it and slurm/launch.sh); KDSCALE_CONFIG picks another YAML.
exec bash "${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train.sh" "${KDSCALE_CONFIG:-configs/kd_imagenet.yaml}" "$@"
