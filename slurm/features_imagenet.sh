#!/usr/bin/env bash
#SBATCH --job-name=kdscale-features-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
# Feature distillation, AM-RADIO's recipe: DINOv2 ViT-L/14 (ZeRO-3 sharded) + CLIP ViT-B/16 -> ResNet-50,
# no labels, on ImageNet (configs/features_imagenet.yaml; its k-NN memory shards are written as its header
# says). GPUs: sbatch --gpus-per-node=8 slurm/features_imagenet.sh (or export SBATCH_GPUS_PER_NODE=8).
# Overrides without editing: sbatch slurm/features_imagenet.sh optim.lr=2e-3, or KDSCALE_OVERRIDES="optim.lr=2e-3";
# KDSCALE_OUTPUT, KDSCALE_DEEPSPEED=zero2, sbatch -N 4 ...
# The generic slurm/train.sh does the work (see it and slurm/launch.sh); KDSCALE_CONFIG picks another YAML.
exec bash "${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train.sh" "${KDSCALE_CONFIG:-configs/features_imagenet.yaml}" "$@"
