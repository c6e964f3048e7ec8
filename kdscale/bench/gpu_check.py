"""The whole GPU check as one command (``bash launch/gpu-check.sh [--dry-run] [OUT_DIR]``):
correctness on the device, then side-by-side figures, then one report, within a time budget.

Parts, each a subprocess with its own time limit; a part that fails or runs out of time is
recorded and the next one still runs:

1. ``environment``: the GPU, driver, CUDA, and every package version that matters;
2. ``correctness``: ``pytest -m gpu`` (``tests/gpu/test_gpu.py``: bf16 + channels-last KD against
   fp32 with the export reloaded, DeepSpeed ZeRO-2 and ZeRO-3 on the device resuming exactly,
   GPU decode against the CPU path, compiled against eager, CRD's banks on the device, the
   ranks' late-read agreement, ``kdscale.teach`` on the device replayed into a run);
3. ``figures``: ``kdscale bench`` sections (compute, ``teachers2``: KD from two online
   teachers against its measured bound and from two replayed teachers against student-only,
   compile, ``data.decode=cpu`` against ``gpu`` by training on ImageNet-size photo-like JPEGs
   with its data-wait fraction, images/s and peak memory, the writer, CRD's banks) at
   ``torchvision:resnet50 -> torchvision:resnet18`` (``teachers2``: the ResNet-50 twice, each with
   random weights of its own), 224 px, batch 128, 16 loader workers.

``--dry-run`` runs the same parts on the CPU at tiny sizes (the correctness tests with
``KDSCALE_GPU_CHECK_DRY_RUN=1``, the benchmark with ``--quick``): CI runs it, so the check
cannot rot. The report is ``OUT_DIR/gpu-check.json`` and ``OUT_DIR/gpu-check.md`` (default
``runs/gpu-check``), ready to paste into docs/benchmarks.md; the total time is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 8 minutes of parts in all; with start-up inside one 10-minute device command. figures: 240 s, and
# 40 s for teachers2 (7 rounds of 20 steps of 5 candidates: student-only, KD from both teachers,
# each teacher's forward, replayed KD; about 20 s on an H100 by FLOPs, twice that allowed)
BUDGET_S = {"correctness": 200, "figures": 280}
FIGURES = "compute,teachers2,compile,decode,writer,crd"
DRY_RUN_FIGURES = "compute,teachers2,decode"
PACKAGES = ("torch", "torchvision", "deepspeed", "accelerate", "webdataset", "wandb", "timm", "torchdistill")


def environment() -> dict:
    import importlib.metadata as metadata

    import torch

    env = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def run_part(name: str, command: list[str], limit_s: float, env: dict, log_path: str) -> dict:
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=limit_s).returncode
            status = "passed" if returncode == 0 else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            status = f"ran out of time ({limit_s:.0f} s)"
    tail = open(log_path, errors="replace").read()[-1500:]
    return {"part": name, "status": status, "seconds": round(time.monotonic() - start, 1), "log": log_path,
            "tail": tail}


def bench_command(out: str, dry_run: bool) -> list[str]:
    python = sys.executable
    if dry_run:
        return [python, "-m", "kdscale.cli", "bench", "--quick", "--device", "cpu", "--teacher", "resnet20",
                "--sections", DRY_RUN_FIGURES, "--no-peer", "--out", out]
    return [python, "-m", "kdscale.cli", "bench", "--device", "cuda", "--student", "torchvision:resnet18",
            "--teacher", "torchvision:resnet50", "--image-size", "224", "--batch", "128", "--workers", "16",
            "--sections", FIGURES, "--out", out]


def report_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({'dry run on the CPU' if report['dry_run'] else env.get('gpu', '?')})", "",
             f"Command: `{report['command']}`; total {report['total_seconds']:.0f} s.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} |" for p in report["parts"]]
    lines += ["", "| environment | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    ratios = report.get("ratios") or {}
    if ratios:
        lines += ["", "| ratio (median over rounds) | value |", "|---|---|"]
        lines += [f"| {key} | {value.get('median') if isinstance(value, dict) else value} |"
                  for key, value in sorted(ratios.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/gpu-check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.path.join("runs", "gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("kdscale gpu-check: error: no CUDA device here; run on a GPU machine, or --dry-run to check the "
              "check on the CPU", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    began = time.monotonic()
    env = dict(os.environ, WANDB_MODE="disabled")
    if args.dry_run:
        env["KDSCALE_GPU_CHECK_DRY_RUN"] = "1"
    report = {"command": "bash launch/gpu-check.sh" + (" --dry-run" if args.dry_run else "") + f" {args.out}",
              "dry_run": args.dry_run, "environment": environment(), "parts": []}
    print(f"kdscale gpu-check: {report['environment'].get('gpu', 'CPU (dry run)')}", flush=True)
    correctness = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                   os.path.join(ROOT, "tests", "gpu", "test_gpu.py"), f"--junitxml={os.path.join(out, 'correctness.xml')}"]
    report["parts"].append(run_part("correctness", correctness, BUDGET_S["correctness"] * (3 if args.dry_run else 1),
                                    env, os.path.join(out, "correctness.log")))
    bench_out = os.path.join(out, "bench")
    report["parts"].append(run_part("figures", bench_command(bench_out, args.dry_run),
                                    BUDGET_S["figures"] * (3 if args.dry_run else 1), env,
                                    os.path.join(out, "figures.log")))
    bench_json = os.path.join(bench_out, "bench.json")
    if os.path.isfile(bench_json):
        report["ratios"] = json.load(open(bench_json)).get("ratios", {})
    report["total_seconds"] = round(time.monotonic() - began, 1)
    with open(os.path.join(out, "gpu-check.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(os.path.join(out, "gpu-check.md"), "w") as fh:
        fh.write(report_markdown(report))
    for part in report["parts"]:
        print(f"kdscale gpu-check: {part['part']}: {part['status']} in {part['seconds']} s (log: {part['log']})")
    print(f"kdscale gpu-check: report {os.path.join(out, 'gpu-check.md')}; total {report['total_seconds']:.0f} s",
          flush=True)
    return 0 if all(p["status"] == "passed" for p in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
