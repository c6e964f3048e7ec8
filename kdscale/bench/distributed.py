"""Benchmarks that need real processes: per-rank memory under DDP and ZeRO-1/2/3 (through
:mod:`kdscale.bench.engine_probe`), and 1 vs 2 process training throughput."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, module_args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``accelerate launch`` with this machine's settings (CPU gloo or all GPUs)."""
    flags = ["--num_machines", "1", "--num_processes", str(processes), "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if processes > 1:
        flags.append("--multi_gpu")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // processes)))
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *flags, *module_args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def bench_memory(out_dir: str, processes: int = 2) -> dict:
    out = {}
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        path = os.path.join(out_dir, f"memory-{strategy}.json")
        result = launch(processes, ["-m", "kdscale.bench.engine_probe", path, "train", strategy, "kd"])
        if result.returncode != 0:
            raise RuntimeError(f"memory probe {strategy} failed:\n{result.stderr[-2000:]}")
        ranks = json.load(open(path))
        out[strategy] = [{k: r[k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes")}
                         for r in ranks]
    ddp = out["ddp"][0]["optimizer_state_bytes"]
    ratios = {f"{s}_optimizer_state_vs_ddp": out[s][0]["optimizer_state_bytes"] / ddp
              for s in ("zero1", "zero2", "zero3")}
    ratios["zero3_parameters_vs_ddp"] = out["zero3"][0]["parameter_bytes"] / out["ddp"][0]["parameter_bytes"]
    return {"per_rank_bytes": out, "ratios": ratios, "processes": processes}


def bench_scaling(train_args: list[str], out_dir: str) -> dict:
    speeds = {}
    for processes in (1, 2):
        name = f"scaling-{processes}"
        result = launch(processes, ["-m", "kdscale.train", *train_args, f"experiment.name={name}",
                                    f"experiment.output_dir={out_dir}", "train.resume=false"])
        if result.returncode != 0:
            raise RuntimeError(f"scaling run with {processes} process(es) failed:\n{result.stderr[-2000:]}")
        logged = [json.loads(line) for line in open(os.path.join(out_dir, name, "metrics.jsonl"))]
        windows = [e["perf/images_per_s"] for e in logged if "perf/images_per_s" in e][1:]  # drop warm-up
        speeds[processes] = sum(windows) / len(windows)
    return {"images_per_s": {str(k): v for k, v in speeds.items()},
            "per_process_efficiency_2_vs_1": speeds[2] / 2 / speeds[1]}
