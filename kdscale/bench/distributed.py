"""Benchmarks that need real processes: per-rank memory under DDP and ZeRO-1/2/3 (through
:mod:`kdscale.probes`), and 1 vs 2 process training throughput.

Memory ratios are byte counts (exact, one round, no spread). Scaling runs in rounds, each a
1-process run followed by a 2-process run, and its ratio is taken per round."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from kdscale.bench.timing import exact_ratio, ratio_over_rounds, spread


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
    """Per-rank parameter, gradient and optimizer-state bytes of the probe net under each strategy."""
    out = {}
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        path = os.path.join(out_dir, f"memory-{strategy}.json")
        result = launch(processes, ["-m", "kdscale.probes", path, "train", strategy, "kd"])
        if result.returncode != 0:
            raise RuntimeError(f"memory probe {strategy} failed:\n{result.stderr[-2000:]}")
        ranks = json.load(open(path))
        out[strategy] = [{k: r[k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes")}
                         for r in ranks]
    return {"per_rank_bytes": out, "ratios": memory_ratios(out), "processes": processes}


def memory_ratios(per_rank_bytes: dict[str, list[dict]]) -> dict[str, dict]:
    """Rank 0's ZeRO bytes over DDP's: optimizer state for ZeRO-1/2/3, parameters for ZeRO-3."""
    ddp = per_rank_bytes["ddp"][0]
    ratios = {f"{s}_optimizer_state_vs_ddp": exact_ratio(per_rank_bytes[s][0]["optimizer_state_bytes"]
                                                          / ddp["optimizer_state_bytes"])
              for s in ("zero1", "zero2", "zero3")}
    ratios["zero3_parameters_vs_ddp"] = exact_ratio(per_rank_bytes["zero3"][0]["parameter_bytes"]
                                                    / ddp["parameter_bytes"])
    return ratios


def bench_crd(out_dir: str, samples: int, negatives: int, batch_per_rank: int = 32, dim: int = 128,
              steps: int = 3) -> dict:
    """CRD's memory banks for ``samples`` training samples on 1 and on 2 ranks: bytes of each
    rank's rows, the resident memory they added, and the contrast loss's seconds per step
    (forward and backward, ``batch_per_rank`` images per rank, ``negatives`` each)."""
    per_rank = {}
    for processes in (1, 2):
        path = os.path.join(out_dir, f"crd-bank-{processes}.json")
        result = launch(processes, ["-m", "kdscale.probes", path, "crd_bank", str(samples), str(dim),
                                    str(batch_per_rank), str(negatives), str(steps)])
        if result.returncode != 0:
            raise RuntimeError(f"CRD bank probe on {processes} process(es) failed:\n{result.stderr[-2000:]}")
        per_rank[str(processes)] = json.load(open(path))
    ratio = per_rank["2"][0]["bank_bytes"] / per_rank["1"][0]["bank_bytes"]
    return {"samples": samples, "dim": dim, "negatives": negatives, "batch_per_rank": batch_per_rank,
            "per_rank": per_rank, "ratios": {"crd_bank_bytes_2_vs_1_rank": exact_ratio(ratio)}}


def training_images_per_s(train_args: list[str], out_dir: str, processes: int, name: str) -> float:
    """Mean logged images/s of one training run, its first (warm-up) window left out."""
    result = launch(processes, ["-m", "kdscale.train", *train_args, f"experiment.name={name}",
                                f"experiment.output_dir={out_dir}", "train.resume=false"])
    if result.returncode != 0:
        raise RuntimeError(f"scaling run with {processes} process(es) failed:\n{result.stderr[-2000:]}")
    logged = [json.loads(line) for line in open(os.path.join(out_dir, name, "metrics.jsonl"))]
    windows = [e["perf/images_per_s"] for e in logged if "perf/images_per_s" in e][1:]
    return sum(windows) / len(windows)


def bench_scaling(train_args: list[str], out_dir: str, rounds: int) -> dict:
    """Per round a 1-process then a 2-process training run; the per-process efficiency
    ``(images/s of 2) / 2 / (images/s of 1)`` is taken per round (median and IQR)."""
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(rounds):
        for processes in (1, 2):
            speeds[processes].append(training_images_per_s(train_args, out_dir, processes,
                                                           f"scaling-{processes}-round{round_index}"))
    per_process_two = [s / 2 for s in speeds[2]]
    return {"images_per_s": {str(p): spread(v) for p, v in speeds.items()},
            "ratios": {"per_process_efficiency_2_vs_1": ratio_over_rounds(per_process_two, speeds[1])}}
