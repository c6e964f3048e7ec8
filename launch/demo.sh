#!/usr/bin/env bash
# The main job end to end on this machine: set up, make a synthetic JPEG dataset as
# webdataset shards, train a teacher, distill a student from it with KD through
# `accelerate launch -m kdscale.train`, train the same student alone (same data, epochs,
# seed and schedule: what distillation buys), print the results of the three runs and
# draw their validation accuracy in one figure (`kdscale compare --plot`).
#
# Environment:
#   KDSCALE_DEMO_SCALE=full|tiny   tiny is a faster setting of the same code path (CI)
#   KDSCALE_DEMO_DATA=dir          where the shards go (default data/demo-synth[-tiny])
#   KDSCALE_DEMO_OUT=dir           where the runs and the figure go (default runs/demo[-tiny]); replaced on rerun
#   KDSCALE_CPU_PROCS=N            processes when there is no GPU (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash launch/setup.sh
scale=${KDSCALE_DEMO_SCALE:-full}
case "$scale" in
  full) train=5000 val=1000 per_shard=500 teacher_epochs=8 student_epochs=6 suffix="" ;;
  tiny) train=1280 val=256 per_shard=128 teacher_epochs=2 student_epochs=1 suffix="-tiny" ;;
  *) echo "demo: KDSCALE_DEMO_SCALE must be full or tiny, got '$scale'" >&2; exit 2 ;;
esac
data=${KDSCALE_DEMO_DATA:-data/demo-synth$suffix}
out=${KDSCALE_DEMO_OUT:-runs/demo$suffix}
if [ -f "$data/index.json" ]; then
  echo "[demo] reusing the synthetic dataset in $data"
else
  .venv/bin/kdscale shards synth --out "$data" --classes 10 --train "$train" --val "$val" --per-shard "$per_shard"
fi
if [ -d "$out" ]; then
  echo "[demo] replacing the previous demo runs in $out"
  rm -rf "$out"
fi
shards=(data.train_shards="$data/train-*.tar" data.val_shards="$data/val-*.tar" experiment.output_dir="$out")
echo "[demo] 1/3 training the teacher (resnet20)"
bash launch/accelerate.sh -m kdscale.train --config configs/demo_teacher.yaml "${shards[@]}" \
  train.epochs="$teacher_epochs"
echo "[demo] 2/3 distilling the student (resnet8) with KD"
bash launch/accelerate.sh -m kdscale.train --config configs/demo_kd.yaml "${shards[@]}" \
  train.epochs="$student_epochs" teacher.weights="$out/demo-teacher/export/student.safetensors"
echo "[demo] 3/3 training the same student (resnet8) alone, without a teacher"
bash launch/accelerate.sh -m kdscale.train --config configs/demo_student.yaml "${shards[@]}" \
  train.epochs="$student_epochs"
echo
echo "[demo] results ($(( $(date +%s) - start )) s in all)"
runs=("$out/demo-teacher" "$out/demo-kd" "$out/demo-student")
.venv/bin/kdscale summary "${runs[@]}"
figure="$out/demo-compare.png"
.venv/bin/kdscale compare "${runs[@]}" --metric val/student_top1 --plot "$figure" >/dev/null
echo "[demo] validation top-1 of the three runs by epoch (kdscale compare --plot): $figure"
