#!/usr/bin/env bash
#SBATCH --job-name=kdscale-teach-imagenet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
# Teacher-output shards for `teacher.source: shards` training (kdscale.teach; resumable,
# so a requeued job continues where it stopped). Pass the teacher and the output folder:
#   KDSCALE_OVERRIDES="teacher.outputs=data/imagenet-r34-outputs" sbatch --gpus-per-node=8 slurm/teach_imagenet.sh
export KDSCALE_CONFIG=${KDSCALE_CONFIG:-configs/kd_imagenet.yaml}
exec bash "${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh" teach
