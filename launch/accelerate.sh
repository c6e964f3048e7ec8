#!/usr/bin/env bash
# `accelerate launch` on this machine: every GPU when there are GPUs, otherwise
# KDSCALE_CPU_PROCS CPU processes (default 2) over gloo. Arguments go to accelerate launch
# after the process flags, e.g.:  launch/accelerate.sh -m kdscale.train --config configs/x.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ]; then
  procs=$gpus
else
  procs=${KDSCALE_CPU_PROCS:-2}
  # One share of the cores per process, or the processes fight over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}
fi
flags=(--num_machines 1 --num_processes "$procs" --mixed_precision no --dynamo_backend no)
# On CPU, --multi_gpu is what makes accelerate start a gloo process group (see docs).
[ "$procs" -gt 1 ] && flags+=(--multi_gpu)
port=${KDSCALE_MAIN_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
flags+=(--main_process_port "$port")
# Through kdscale's job launcher (kdscale/lifecycle/launcher.py): the job exits with the status
# its ranks agreed on (0 done or preempted, 130 Ctrl-C, 143 SIGTERM, 2 refused, 3 stalled), in
# one line, however it was signalled (this process, its process group, or every process).
exec .venv/bin/python -m kdscale.lifecycle.launcher .venv/bin/accelerate launch "${flags[@]}" "$@"
