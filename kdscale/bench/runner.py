"""``kdscale bench``: every figure a ratio measured side by side in one run, written as JSON
and a markdown table (with the machine, the date and the command).

Each timed ratio is computed per measurement round and reported as the median over the
rounds with its interquartile range (``ratios[name]``: median, q25, q75, iqr, rounds); byte
ratios are exact (one value). Goals are judged on the median."""

from __future__ import annotations

import datetime
import difflib
import json
import os
import platform
import sys

import torch

from kdscale.errors import KdscaleError

SECTIONS = ("compute", "teachers2", "compile", "data", "imagenet_data", "decode", "writer", "memory", "crd", "scaling")
GOALS = {  # ratio -> (goal, description)
    "overhead_kdscale_vs_hand_written": (0.95, "kdscale KD step / hand-written PyTorch loop"),
    "online_kd_vs_student_only": (None, "online-teacher KD / student alone"),
    "online_kd_measured_bound": (None, "bound of that ratio: student-only step + teacher forward, same round"),
    "online_kd_fraction_of_bound": (0.90, "online-teacher KD speed as a fraction of its measured bound"),
    "shard_kd_vs_student_only": (0.90, "KD from stored teacher outputs / student alone (compute path)"),
    "teachers2_online_kd_vs_student_only": (None, "KD from two online teachers / student alone"),
    "teachers2_online_kd_measured_bound": (None, "bound of that ratio: student-only step + both teachers' forwards"),
    "teachers2_online_kd_fraction_of_bound": (0.95, "KD from two online teachers as a fraction of its measured bound"),
    "teachers2_shard_kd_vs_student_only": (0.90, "KD from two replayed teachers' outputs / student alone"),
    "kdscale_vs_torchdistill": (1.00, "kdscale KD step / torchdistill DistillationBox step"),
    "webdataset_vs_imagefolder": (1.00, "kdscale webdataset loader / torchvision ImageFolder loader"),
    "replay_vs_webdataset": (0.90, "teacher-shard replay loader / plain webdataset loader"),
    "webdataset_vs_imagefolder_imagenet_size": (1.00, "the same on ImageNet-size JPEGs (~500x375, ~110 KB) at 224 px"),
    "replay_vs_webdataset_imagenet_size": (0.90, "replay / plain loader on ImageNet-size JPEGs at 224 px"),
    "writer_vs_teacher_inference": (0.80, "kdscale.teach images/s x R crops / the teacher's batched inference"),
    "zero1_optimizer_state_vs_ddp": (0.55, "ZeRO-1 per-rank optimizer state / DDP's (goal: at most)"),
    "zero2_optimizer_state_vs_ddp": (0.55, "ZeRO-2 per-rank optimizer state / DDP's (goal: at most)"),
    "zero3_optimizer_state_vs_ddp": (0.55, "ZeRO-3 per-rank optimizer state / DDP's (goal: at most)"),
    "zero3_parameters_vs_ddp": (0.55, "ZeRO-3 per-rank parameters / DDP's (goal: at most)"),
    "per_process_efficiency_2_vs_1": (None, "images/s per process, 2 processes / 1"),
    "compiled_vs_eager_online_kd": (None, "online KD step with train.compile=all / eager"),
    "decode_gpu_vs_cpu": (None, "training images/s with data.decode=gpu / cpu, ImageNet-size JPEGs"),
    "crd_bank_bytes_2_vs_1_rank": (0.501, "CRD memory-bank bytes per rank, 2 ranks / 1 "
                                          "(goal: at most; half, plus a row for an odd N)"),
}
AT_MOST = {"zero1_optimizer_state_vs_ddp", "zero2_optimizer_state_vs_ddp", "zero3_optimizer_state_vs_ddp", "zero3_parameters_vs_ddp",
           "crd_bank_bytes_2_vs_1_rank"}


def parse_sections(text: str) -> tuple[str, ...]:
    """``--sections``: ``all`` or a comma list of SECTIONS; an unknown name is an error before any work."""
    if text.strip() == "all":
        return SECTIONS
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise KdscaleError(f"--sections: no section given; valid sections: all, {', '.join(SECTIONS)}")
    for name in names:
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise KdscaleError(f"--sections: unknown section {name!r}; {hint}valid sections: all, {', '.join(SECTIONS)}")
    return names


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


def prepare_data(out: str, quick: bool, image_size: int, num_classes: int, teacher: str,
                 photo_like: bool = False) -> tuple[str, str]:
    """Synthetic shards and their teacher outputs: ``image_size`` squares, or ImageNet-size
    photo-like JPEGs (``photo_like``; a smaller set, as each costs ~30x more to decode)."""
    from kdscale.config import load_config
    from kdscale.data.synth import write_synthetic_shards
    from kdscale.teach.run import teach

    data = os.path.join(out, "data-imagenet-size" if photo_like else "data")
    if not os.path.isfile(os.path.join(data, "index.json")):
        train = (256 if quick else 1536) if photo_like else (1024 if quick else 8192)
        write_synthetic_shards(data, num_classes=num_classes, train_samples=train, val_samples=32 if photo_like else 128,
                               image_size=max(image_size, 64 if not quick else image_size), photo_like=photo_like,
                               samples_per_shard=128 if quick or photo_like else 512, progress=False)
    outputs = os.path.join(out, "teacher-outputs-imagenet-size" if photo_like else "teacher-outputs")
    cfg = load_config(None, [f"data.train_shards={data}/train-*.tar", f"data.num_classes={num_classes}",
                             f"data.image_size={image_size}", "data.augment=imagenet", "method.name=kd",
                             f"teacher.name={teacher}", f"teacher.outputs={outputs}", "teacher.crops_per_image=4",
                             "teacher.top_k=5", "wandb.mode=disabled"])
    teach(cfg)
    return data, outputs


def spread_text(entry: dict) -> str:
    """``IQR (q25-q75)`` of a ratio, or ``exact`` for a ratio with one value (bytes)."""
    if len(entry["rounds"]) == 1:
        return "exact"
    return f"{entry['iqr']:.3f} ({entry['q25']:.3f}-{entry['q75']:.3f})"


def format_report(result: dict) -> str:
    """The markdown report: every ratio with its median, IQR and goal, then the raw figures."""
    lines = [f"kdscale bench, {result['date']}", f"command: `{result['command']}`",
             f"machine: {result['machine']['cores']} cores, {result['machine'].get('cpu')}, "
             f"GPU: {result['machine']['gpu'] or 'none'}, torch {result['machine']['torch']}", "",
             "| ratio | median | IQR (25th-75th) | rounds | goal | meets goal | what |", "|---|---|---|---|---|---|---|"]
    for name, entry in result["ratios"].items():
        goal, what = GOALS.get(name, (None, ""))
        value = entry["median"]
        verdict = "-" if goal is None else ("yes" if (value <= goal if name in AT_MOST else value >= goal) else "no")
        goal_text = "-" if goal is None else (f"<= {goal}" if name in AT_MOST else f">= {goal}")
        lines.append(f"| {name} | {value:.3f} | {spread_text(entry)} | {len(entry['rounds'])} | {goal_text} "
                     f"| {verdict} | {what} |")
    for section in ("compute", "teachers2", "compile", "data", "imagenet_data"):
        if section in result:
            workers = result[section].get("workers")
            per_worker = (lambda r: f", {r['images_per_s'] / workers:.1f} per loader worker") if workers else \
                (lambda r: "")
            lines += ["", f"{section} throughput (images/s, median and IQR of rounds):"]
            lines += [f"- {name}: {r['images_per_s']:.1f} (IQR {r['iqr']:.1f}){per_worker(r) if section != 'compute' else ''}"
                      for name, r in result[section]["throughput"].items()]
    flop = result.get("compute", {}).get("flop_model")
    if flop:
        lines += ["", f"FLOP model, information only (not a goal): 3F_s / (3F_s + F_t) = "
                      f"{flop['online_kd_vs_student_only']:.3f} for online KD / student only "
                      f"(F_s {flop['student_forward_gflops']:.4f}, F_t {flop['teacher_forward_gflops']:.4f} "
                      f"GFLOPs per image)"]
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
    if "crd" in result:
        crd = result["crd"]
        lines += ["", f"CRD memory banks, {crd['samples']} samples x {crd['dim']} (bytes of the rows / resident "
                      f"memory added / contrast-loss seconds per step, {crd['batch_per_rank']} images per rank x "
                      f"{crd['negatives']} negatives):"]
        lines += [f"- {processes} rank(s): " + "; ".join(
            f"rank {i}: {r['bank_bytes'] / 2**20:.1f} MiB / {r['resident_bytes_added'] / 2**20:.1f} MiB / "
            f"{r['step_seconds']:.3f} s" for i, r in enumerate(ranks)) for processes, ranks in crd["per_rank"].items()]
    if "decode" in result:
        decode = result["decode"]
        lines += ["", f"data.decode, training {decode['student']} alone ({decode['image_size']} px, batch "
                      f"{decode['batch']}, {decode['workers']} workers; medians of the last log window):"]
        for mode, m in decode["median"].items():
            peak = f"device {m['mem/max_allocated_gb']:.2f}" if m["mem/max_allocated_gb"] else \
                f"host {m['mem/max_rss_gb']:.2f}"
            lines.append(f"- {mode}: {m['perf/images_per_s']:.1f} images/s, data wait "
                         f"{m['perf/data_wait_frac']:.2f}, peak {peak} GB")
        lines.append(f"- {decode['advice']}")
    if "scaling" in result:
        lines += ["", "training images/s (median, IQR): " + ", ".join(
            f"{k} process(es) {v['median']:.1f} (IQR {v['iqr']:.1f})"
            for k, v in result["scaling"]["images_per_s"].items())]
    return "\n".join(lines) + "\n"


def run_bench(args) -> dict:
    from kdscale.bench.compute import Setup, bench_compute
    from kdscale.bench.data_bench import bench_data
    from kdscale.bench.distributed import bench_memory, bench_scaling

    sections = parse_sections(args.sections)  # before any work: a misspelled name is not silently skipped
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else (
        "cpu" if args.device == "auto" else args.device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("runs", "bench", stamp)
    os.makedirs(out, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "kdscale bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
              "machine": machine(), "settings": {"student": args.student, "teacher": args.teacher,
                                                 "image_size": args.image_size, "batch": args.batch,
                                                 "device": device, "quick": args.quick}, "ratios": {}}
    steps, rounds = (4, 5) if args.quick else (20, 7)
    data_rounds, scaling_rounds = (3, 2) if args.quick else (5, 3)
    result["settings"]["rounds"] = {"compute": rounds, "compute_steps_per_round": steps, "data": data_rounds,
                                    "scaling": scaling_rounds}
    if "compute" in sections:
        setup = Setup(args.student, args.teacher, args.image_size, args.batch, args.num_classes, device)
        result["compute"] = bench_compute(setup, steps, rounds, peer=not args.no_peer)
        result["ratios"].update(result["compute"]["ratios"])
        if args.profile:
            result["compute"]["profile"] = profile_step(setup, os.path.join(out, "profile.txt"))
    if "teachers2" in sections:  # two online / two replayed teachers: the --teacher network twice, random weights
        from kdscale.bench.compute import bench_teachers

        result["teachers2"] = bench_teachers(Setup(args.student, args.teacher, args.image_size, args.batch,
                                                   args.num_classes, device, teachers=2), steps, rounds)
        result["ratios"].update(result["teachers2"]["ratios"])
    if "compile" in sections:
        from kdscale.bench.compile_bench import bench_compile

        result["compile"] = bench_compile(Setup(args.student, args.teacher, args.image_size, args.batch,
                                                args.num_classes, device), steps, rounds)
        result["ratios"].update(result["compile"]["ratios"])
    if "data" in sections or "scaling" in sections:
        data_dir, outputs = prepare_data(out, args.quick, args.image_size, args.num_classes, args.teacher)
    if "data" in sections:
        result["data"] = bench_data(data_dir, args.image_size, args.batch, args.workers,
                                    batches=6 if args.quick else 40, rounds=data_rounds,
                                    num_classes=args.num_classes, teacher_outputs=outputs)
        result["ratios"].update(result["data"]["ratios"])
    if "imagenet_data" in sections:  # decode and crop dominate here, as on ImageNet; a tiny teacher writes the outputs
        photo_dir, photo_outputs = prepare_data(out, args.quick, 224, args.num_classes, "resnet8", photo_like=True)
        result["imagenet_data"] = bench_data(photo_dir, 224, 32, args.workers, batches=6 if args.quick else 40,
                                             rounds=data_rounds, num_classes=args.num_classes,
                                             teacher_outputs=photo_outputs)
        result["ratios"].update({f"{name}_imagenet_size": value
                                 for name, value in result["imagenet_data"]["ratios"].items()})
    if "decode" in sections:  # data.decode=cpu vs gpu, by training on ImageNet-size photo-like JPEGs
        from kdscale.bench.decode_bench import bench_decode

        photo_dir, _ = prepare_data(out, args.quick, 224, args.num_classes, "resnet8", photo_like=True)
        result["decode"] = bench_decode(photo_dir, out, args.student, 64 if args.quick else args.image_size,
                                        8 if args.quick else args.batch, args.workers, 4 if args.quick else 30,
                                        1 if args.quick else 3, args.num_classes)
        result["ratios"].update(result["decode"]["ratios"])
    if "writer" in sections:  # kdscale.teach against the same teacher's batched inference, same batch and device
        from kdscale.bench.writer_bench import bench_writer

        writer_data, _ = prepare_data(out, args.quick, args.image_size, args.num_classes, args.teacher)
        result["writer"] = bench_writer(writer_data, out, teacher=args.teacher, image_size=args.image_size,
                                        batch=args.batch, num_classes=args.num_classes, device=device,
                                        workers=args.workers, rounds=data_rounds, shards=4 if args.quick else 8)
        result["ratios"].update(result["writer"]["ratios"])
    if "memory" in sections:
        result["memory"] = bench_memory(out)
        result["ratios"].update(result["memory"]["ratios"])
    if "crd" in sections:  # quick: CIFAR-100's 50000 samples; full: ImageNet's 1281167
        from kdscale.bench.distributed import bench_crd

        result["crd"] = bench_crd(out, samples=50000 if args.quick else 1281167, negatives=4096 if args.quick else 16384)
        result["ratios"].update(result["crd"]["ratios"])
    if "scaling" in sections:
        train_args = [f"data.train_shards={data_dir}/train-*.tar", f"data.val_shards={data_dir}/val-*.tar",
                      f"data.num_classes={args.num_classes}", f"data.image_size={args.image_size}",
                      f"data.batch_size={args.batch // 2}", "data.num_workers=1", f"student.name={args.student}",
                      "wandb.mode=disabled", "train.log_every_steps=2", "train.epochs=1",
                      f"data.train_samples={(args.batch // 2) * 2 * (12 if args.quick else 40)}"]
        result["scaling"] = bench_scaling(train_args, out, scaling_rounds)
        result["ratios"].update(result["scaling"]["ratios"])
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
