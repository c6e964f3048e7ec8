#!/usr/bin/env bash
# One Slurm task per node: `accelerate launch` for this node's share of the processes.
# Called by slurm/launch.sh through srun; reads the environment that script exports.
set -euo pipefail
mode=$1
cd "$KDSCALE_REPO"
nodes=${SLURM_JOB_NUM_NODES:-1}
gpus=${KDSCALE_GPUS_PER_NODE:-}
if [ -z "$gpus" ]; then
  gpus=0
  command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ]; then
  per_node=$gpus
else
  per_node=${KDSCALE_CPU_PROCS_PER_NODE:-1}
  cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / per_node > 0 ? cpus / per_node : 1 ))}
fi
total=$(( per_node * nodes ))
flags=(--num_machines "$nodes" --machine_rank "$SLURM_NODEID" --num_processes "$total"
       --main_process_ip "$KDSCALE_MAIN_ADDR" --main_process_port "$KDSCALE_MAIN_PORT"
       --mixed_precision no --dynamo_backend no --rdzv_backend static --same_network)
if [ -n "${KDSCALE_DEEPSPEED:-}" ]; then
  # DeepSpeed across nodes with the standard (torchrun) launcher: no pdsh/ssh between nodes.
  flags+=(--use_deepspeed --zero_stage "${KDSCALE_DEEPSPEED#zero}" --deepspeed_multinode_launcher standard)
elif [ "$total" -gt 1 ]; then
  flags+=(--multi_gpu)  # with no GPU this starts a gloo process group on CPUs
fi
read -r -a overrides <<< "${KDSCALE_OVERRIDES:-}"
if [ -n "${KDSCALE_OUTPUT:-}" ]; then overrides+=("experiment.output_dir=$KDSCALE_OUTPUT"); fi
echo "kdscale slurm: node $SLURM_NODEID ($(hostname -s)): $per_node of $total processes"
# Through kdscale's job launcher: the node's status is what its ranks agreed on (0 for a
# preemption stop, 143 for scancel / a time limit, 2 for a refused run), with no traceback.
exec "$KDSCALE_PYTHON" -m kdscale.lifecycle.launcher "$KDSCALE_PYTHON" -m accelerate.commands.launch "${flags[@]}" \
  -m "kdscale.$mode" --config "$KDSCALE_CONFIG" "${overrides[@]}"
