#!/usr/bin/env bash
# Reproduce a table of kdscale's methods: import the dataset, train the teachers, run every
# method's config over several seeds (kdscale sweep), print mean +- std per method next to
# the published figure (kdscale compare --group-by method).
#
#   bash launch/reproduce.sh cifar100 [--seeds 0,1,2] [--root DIR] [--out DIR] [--tiny]
#
# cifar100: torchvision's CIFAR-100 files under --root (default data/cifar100-torchvision;
# add --download where the network allows it), shards in data/cifar100, runs in --out
# (default runs/reproduce-cifar100). Every run is a normal resumable run: rerunning the
# command resumes what was interrupted and skips what finished.
# --tiny: the same pipeline on a small synthetic 100-class set, one epoch of a few batches
# per run (minutes on a CPU; what CI runs), to check the pipeline, not the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
table=${1:?usage: bash launch/reproduce.sh cifar100 [--seeds 0,1,2] [--root DIR] [--out DIR] [--download] [--tiny]}
shift
seeds=0,1,2 root=data/cifar100-torchvision out="" tiny=0 download=()
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) seeds=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --download) download=(--download); shift ;;
    --tiny) tiny=1; shift ;;
    *) echo "reproduce: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$table" != cifar100 ]; then
  echo "reproduce: no table named '$table' (known: cifar100)" >&2
  exit 2
fi
[ -x .venv/bin/python ] || bash launch/setup.sh
kdscale=(.venv/bin/python -m kdscale.cli)
if [ "$tiny" = 1 ]; then
  out=${out:-runs/reproduce-cifar100-tiny}
  data=$out/data
  [ -f "$data/index.json" ] || "${kdscale[@]}" shards synth --out "$data" --classes 100 --train 256 --val 64 \
    --size 32 --per-shard 64 --quiet
  common=(data.train_shards="$data/train-*.tar" data.val_shards="$data/val-*.tar" data.train_samples=64
          data.knn_memory_shards="$data/train-*.tar" data.knn_memory_samples=64
          data.batch_size=32 data.num_workers=0 train.epochs=1 train.log_every_steps=1 wandb.mode=disabled)
else
  out=${out:-runs/reproduce-cifar100}
  data=data/cifar100
  [ -f "$data/index.json" ] || "${kdscale[@]}" shards from-torchvision CIFAR100 --root "$root" --out "$data" \
    "${download[@]}"
  common=()
fi
common+=(experiment.output_dir="$out")
echo "reproduce: teachers"
for teacher in configs/vanilla_cifar100_r32x4.yaml configs/vanilla_cifar100_wrn40x2.yaml; do
  .venv/bin/python -m kdscale.train --config "$teacher" "${common[@]}"
done
for config in configs/*_cifar100.yaml; do  # every method's CIFAR-100 config
  case $config in configs/vanilla_*) continue ;; esac
  # Each teacher trained above, in this output folder: teacher.weights, or teachers.<i>.weights of a list.
  mapfile -t extra < <(.venv/bin/python - "$config" "$out" <<'EOF'
import sys

import yaml

config, out = yaml.safe_load(open(sys.argv[1])), sys.argv[2]
single = config.get("teacher") if isinstance(config.get("teacher"), dict) else None
for key, spec in ([("teacher", single)] if single else []) + [(f"teachers.{i}", t) for i, t in
                                                             enumerate(config.get("teachers") or [])]:
    weights = str(spec.get("weights") or "")
    if weights.startswith("runs/"):
        print(f"{key}.weights={out}/{weights[len('runs/'):]}")
EOF
)
  echo "reproduce: $config over seeds $seeds"
  "${kdscale[@]}" sweep --config "$config" --seeds "$seeds" "${common[@]}" "${extra[@]}"
done
"${kdscale[@]}" compare --group-by method,student,teacher "$out"/*-s[0-9]*
