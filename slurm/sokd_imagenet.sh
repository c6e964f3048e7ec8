#!/usr/bin/env bash
#SBATCH --job-name=kdscale-sokd-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
# SOKD on ImageNet (configs/sokd_imagenet.yaml). GPUs: sbatch --gpus-per-node=8 slurm/sokd_imagenet.sh
# (or export SBATCH_GPUS_PER_NODE=8). Overrides without editing: KDSCALE_OVERRIDES="optim.lr=0.2",
# KDSCALE_OUTPUT, KDSCALE_DEEPSPEED=zero2, sbatch -N 4 ... (see slurm/launch.sh).
export KDSCALE_CONFIG=${KDSCALE_CONFIG:-configs/sokd_imagenet.yaml}
exec bash "${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh" train
