"""``kdscale bench``: every figure a ratio measured side by side in one run, written as JSON
and a markdown table (with the machine, the date and the command)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch

SECTIONS = ("compute", "data", "memory", "scaling")
GOALS = {  # ratio -> (goal, description)
    "overhead_kdscale_vs_hand_written": (0.95, "kdscale KD step / hand-written PyTorch loop"),
    "online_kd_fraction_of_bound": (0.90, "online-teacher KD speed as a fraction of its FLOP bound"),
    "shard_kd_vs_student_only": (0.90, "KD from stored teacher outputs / student alone (compute path)"),
    "kdscale_vs_torchdistill": (1.00, "kdscale KD step / torchdistill DistillationBox step"),
    "webdataset_vs_imagefolder": (1.00, "kdscale webdataset loader / torchvision ImageFolder loader"),
    "replay_vs_webdataset": (0.90, "teacher-shard replay loader / plain webdataset loader"),
    "zero2_optimizer_state_vs_ddp": (0.55, "ZeRO-2 per-rank optimizer state / DDP's (goal: at most)"),
    "zero3_optimizer_state_vs_ddp": (0.55, "ZeRO-3 per-rank optimizer state / DDP's (goal: at most)"),
    "zero3_parameters_vs_ddp": (0.55, "ZeRO-3 per-rank parameters / DDP's (goal: at most)"),
    "per_process_efficiency_2_vs_1": (None, "images/s per process, 2 processes / 1"),
}
AT_MOST = {"zero2_optimizer_state_vs_ddp", "zero3_optimizer_state_vs_ddp", "zero3_parameters_vs_ddp"}


def machine() -> dict:
    info = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": None}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        info["cpu"] = None
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def prepare_data(out: str, quick: bool, image_size: int, num_classes: int, teacher: str) -> tuple[str, str]:
    from kdscale.config import load_config
    from kdscale.data.synth import write_synthetic_shards
    from kdscale.teach.writer import teach

    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "index.json")):
        write_synthetic_shards(data, num_classes=num_classes, train_samples=1024 if quick else 8192,
                               val_samples=128, image_size=max(image_size, 64 if not quick else image_size),
                               samples_per_shard=128 if quick else 512, progress=False)
    outputs = os.path.join(out, "teacher-outputs")
    cfg = load_config(None, [f"data.train_shards={data}/train-*.tar", f"data.num_classes={num_classes}",
                             f"data.image_size={image_size}", "data.augment=imagenet", "method.name=kd",
                             f"teacher.name={teacher}", f"teacher.outputs={outputs}", "teacher.crops_per_image=4",
                             "teacher.top_k=5"])
    teach(cfg)
    return data, outputs


def format_report(result: dict) -> str:
    lines = [f"kdscale bench, {result['date']}", f"command: `{result['command']}`",
             f"machine: {result['machine']['cores']} cores, {result['machine'].get('cpu')}, "
             f"GPU: {result['machine']['gpu'] or 'none'}, torch {result['machine']['torch']}", "",
             "| ratio | value | goal | meets goal | what |", "|---|---|---|---|---|"]
    for name, value in result["ratios"].items():
        goal, what = GOALS.get(name, (None, ""))
        verdict = "-" if goal is None else ("yes" if (value <= goal if name in AT_MOST else value >= goal) else "no")
        goal_text = "-" if goal is None else (f"<= {goal}" if name in AT_MOST else f">= {goal}")
        lines.append(f"| {name} | {value:.3f} | {goal_text} | {verdict} | {what} |")
    for section in ("compute", "data"):
        if section in result:
            lines += ["", f"{section} throughput (images/s, median of rounds):"]
            lines += [f"- {name}: {r['images_per_s']:.1f}" for name, r in result[section]["throughput"].items()]
    startup = result.get("data", {}).get("worker_startup_s")
    if startup:
        lines += ["", f"loader start-up to the first batch: {startup['forkserver']:.2f} s with forkserver workers "
                      f"(kdscale), {startup['fork']:.2f} s with forked ones"]
    if result.get("compute", {}).get("first_batch_loss"):
        losses = result["compute"]["first_batch_loss"]
        lines += ["", "first-batch KD loss: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items())]
    if "memory" in result:
        lines += ["", "per-rank bytes on 2 ranks (parameters / gradients / optimizer state):"]
        for strategy, ranks in result["memory"]["per_rank_bytes"].items():
            r = ranks[0]
            lines.append(f"- {strategy}: {r['parameter_bytes']} / {r['gradient_bytes']} / {r['optimizer_state_bytes']}")
    if "scaling" in result:
        lines += ["", "training images/s: " + ", ".join(f"{k} process(es) {v:.1f}"
                                                      for k, v in result["scaling"]["images_per_s"].items())]
    return "\n".join(lines) + "\n"


def run_bench(args) -> dict:
    from kdscale.bench.compute import Setup, bench_compute
    from kdscale.bench.data_bench import bench_data
    from kdscale.bench.distributed import bench_memory, bench_scaling

    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else (
        "cpu" if args.device == "auto" else args.device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("runs", "bench", stamp)
    os.makedirs(out, exist_ok=True)
    sections = SECTIONS if args.sections == "all" else tuple(args.sections.split(","))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "kdscale bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
              "machine": machine(), "settings": {"student": args.student, "teacher": args.teacher,
                                                 "image_size": args.image_size, "batch": args.batch,
                                                 "device": device, "quick": args.quick}, "ratios": {}}
    steps, rounds = (4, 5) if args.quick else (20, 7)
    if "compute" in sections:
        setup = Setup(args.student, args.teacher, args.image_size, args.batch, args.num_classes, device)
        result["compute"] = bench_compute(setup, steps, rounds, peer=not args.no_peer)
        result["ratios"].update(result["compute"]["ratios"])
        if args.profile:
            result["compute"]["profile"] = profile_step(setup, os.path.join(out, "profile.txt"))
    if "data" in sections or "scaling" in sections:
        data_dir, outputs = prepare_data(out, args.quick, args.image_size, args.num_classes, args.teacher)
    if "data" in sections:
        result["data"] = bench_data(data_dir, args.image_size, args.batch, args.workers,
                                    batches=6 if args.quick else 40, rounds=3 if args.quick else 5,
                                    num_classes=args.num_classes, teacher_outputs=outputs)
        result["ratios"].update(result["data"]["ratios"])
    if "memory" in sections:
        result["memory"] = bench_memory(out)
        result["ratios"].update(result["memory"]["ratios"])
    if "scaling" in sections:
        train_args = [f"data.train_shards={data_dir}/train-*.tar", f"data.val_shards={data_dir}/val-*.tar",
                      f"data.num_classes={args.num_classes}", f"data.image_size={args.image_size}",
                      f"data.batch_size={args.batch // 2}", "data.num_workers=1", f"student.name={args.student}",
                      "wandb.mode=disabled", "train.log_every_steps=2", "train.epochs=1",
                      f"data.train_samples={(args.batch // 2) * 2 * (12 if args.quick else 40)}"]
        result["scaling"] = bench_scaling(train_args, out)
        result["ratios"].update({"per_process_efficiency_2_vs_1": result["scaling"]["per_process_efficiency_2_vs_1"]})
    with open(os.path.join(out, "bench.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    report = format_report(result)
    with open(os.path.join(out, "bench.md"), "w") as fh:
        fh.write(report)
    print(report)
    print(f"written: {os.path.join(out, 'bench.json')}, {os.path.join(out, 'bench.md')}")
    result["out"] = out
    return result


def profile_step(setup, path: str) -> str:
    """torch.profiler over kdscale KD steps; the top operators go to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    step = setup.kdscale_step("kd", "online")
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if setup.on_gpu else "self_cpu_time_total",
                                      row_limit=25)
    with open(path, "w") as fh:
        fh.write(table)
    return path
