#!/usr/bin/env bash
# The shared Slurm launcher behind slurm/*_imagenet.sh (run as the batch script's body).
#
# One task per node runs `accelerate launch` (slurm/node.sh) with --machine_rank from
# SLURM_NODEID and the first node as the main address; every GPU of a node is used, or
# KDSCALE_CPU_PROCS_PER_NODE CPU processes where there are none. On the preemption signal
# (#SBATCH --signal=B:USR1@...) the batch shell creates $KDSCALE_PREEMPT_FILE; every rank
# then stops at the same step with a checkpoint, and this script requeues the job, which
# resumes from the newest checkpoint and the same wandb run.
#
# Everything is overridable from the environment, no editing needed:
#   KDSCALE_CONFIG      experiment YAML (relative to the repository)       [required]
#   KDSCALE_OVERRIDES   dotted overrides, space-separated ("optim.lr=0.2 train.epochs=90")
#   KDSCALE_OUTPUT      experiment.output_dir
#   KDSCALE_REPO        repository root (default: the directory sbatch was run from)
#   KDSCALE_PYTHON      python with kdscale installed (default: $KDSCALE_REPO/.venv/bin/python)
#   KDSCALE_GPUS_PER_NODE, KDSCALE_CPU_PROCS_PER_NODE, KDSCALE_MAIN_PORT
#   KDSCALE_DEEPSPEED=zero1|zero2|zero3   launch through accelerate's DeepSpeed path
# Nodes and GPUs come from sbatch itself: sbatch -N 4 --gpus-per-node=8 slurm/ctkd_imagenet.sh
set -euo pipefail
mode=${1:-train}
export KDSCALE_REPO=${KDSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$KDSCALE_REPO"
: "${KDSCALE_CONFIG:?kdscale slurm: set KDSCALE_CONFIG to an experiment YAML, e.g. configs/ctkd_imagenet.yaml}"
if [ ! -f "$KDSCALE_CONFIG" ]; then
  echo "kdscale slurm: error: config file not found: $KDSCALE_CONFIG (relative to $KDSCALE_REPO on $(hostname -s));" \
       "put the repository on a filesystem every node sees, or set KDSCALE_REPO / KDSCALE_CONFIG" >&2
  exit 2
fi
export KDSCALE_PYTHON=${KDSCALE_PYTHON:-$KDSCALE_REPO/.venv/bin/python}
if [ ! -x "$KDSCALE_PYTHON" ]; then
  echo "kdscale slurm: error: no python at $KDSCALE_PYTHON; run launch/setup.sh once or set KDSCALE_PYTHON" >&2
  exit 2
fi
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The node's address as Slurm knows it (hostnames of test clusters need not resolve).
addr=$(scontrol show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
export KDSCALE_MAIN_ADDR=${KDSCALE_MAIN_ADDR:-${addr:-$first}}
export KDSCALE_MAIN_PORT=${KDSCALE_MAIN_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
export KDSCALE_PREEMPT_FILE=${KDSCALE_PREEMPT_FILE:-$KDSCALE_REPO/.kdscale-preempt-${SLURM_JOB_ID:-local}}
rm -f "$KDSCALE_PREEMPT_FILE"
echo "kdscale slurm: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-1} node(s)," \
     "main $KDSCALE_MAIN_ADDR:$KDSCALE_MAIN_PORT, config $KDSCALE_CONFIG ${KDSCALE_OVERRIDES:-}"
# The main node must be reachable before anything starts.
if ! timeout 5 bash -c "getent hosts $KDSCALE_MAIN_ADDR >/dev/null || [[ $KDSCALE_MAIN_ADDR =~ ^[0-9.]+$ ]]"; then
  echo "kdscale slurm: error: main node address $KDSCALE_MAIN_ADDR does not resolve; set KDSCALE_MAIN_ADDR" >&2
  exit 2
fi
trap 'echo "kdscale slurm: preemption signal: checkpointing, then requeueing"; touch "$KDSCALE_PREEMPT_FILE"' USR1
set +e
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$KDSCALE_REPO/slurm/node.sh" "$mode" &
step=$!
while true; do
  wait "$step"
  rc=$?
  kill -0 "$step" 2>/dev/null || break  # still running: wait was interrupted by the trap
done
set -e
if [ -f "$KDSCALE_PREEMPT_FILE" ]; then
  rm -f "$KDSCALE_PREEMPT_FILE"
  if [ "$rc" -eq 0 ]; then
    echo "kdscale slurm: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
fi
exit "$rc"
