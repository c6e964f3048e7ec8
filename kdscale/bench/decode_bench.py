"""``data.decode=cpu`` against ``data.decode=gpu``, measured by training: the student alone
(``vanilla``) on ImageNet-size photo-like JPEGs, the same steps, batch, workers and device
for each, alternating the two modes over rounds.

Each run is a real ``Trainer`` (the loader, the device views, the step), so the figures are
what a run logs: ``perf/images_per_s``, ``perf/data_wait_frac`` (the share of wall time the
step waited for its batch), and peak memory (``mem/max_allocated_gb`` on a GPU, the host's
``mem/max_rss_gb``), taken from the last log window (the first window holds the workers'
start-up). The ratio is ``decode_gpu_vs_cpu`` (images/s, median over rounds).

The rule ``data.decode`` would follow if it were chosen automatically: GPU decode pays off
when the CPU path leaves the step waiting for data (``data_wait_frac`` above about 0.1) and
GPU decode is faster end to end; :func:`decode_advice` states it on the figures measured.
"""

from __future__ import annotations

import json
import os
import statistics

from kdscale.bench.timing import ratio_over_rounds


def _last_window(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        windows = [json.loads(line) for line in fh if '"perf/images_per_s"' in line]
    return windows[-1]


def bench_decode(data_dir: str, out: str, student: str, image_size: int, batch: int, workers: int, steps: int,
                 rounds: int, num_classes: int) -> dict:
    """Both modes ``rounds`` times, alternating which goes first, on the device the trainer
    picks (the GPU where there is one)."""
    from kdscale.config import load_config
    from kdscale.train.loop import Trainer

    per_mode: dict[str, list[dict]] = {"cpu": [], "gpu": []}
    for round_index in range(rounds):
        for mode in ("cpu", "gpu") if round_index % 2 == 0 else ("gpu", "cpu"):
            cfg = load_config(None, [
                f"experiment.name=decode-{mode}-{round_index}", f"experiment.output_dir={os.path.join(out, 'decode')}",
                f"data.train_shards={data_dir}/train-*.tar", f"data.val_shards={data_dir}/val-*.tar",
                f"data.num_classes={num_classes}", f"data.image_size={image_size}", f"data.batch_size={batch}",
                f"data.num_workers={workers}", "data.augment=imagenet", f"data.decode={mode}",
                f"data.train_samples={batch * steps}", "method.name=vanilla", f"student.name={student}",
                "wandb.mode=disabled", f"train.log_every_steps={max(1, steps // 2)}", "train.epochs=1",
                f"train.stop_after_steps={steps}", "train.checkpoint_every_steps=0", "train.resume=false"])
            trainer = Trainer(cfg)
            try:
                trainer.train()
            finally:
                trainer.close()
            window = _last_window(cfg.run_dir)
            per_mode[mode].append({key: window.get(key) for key in
                                   ("perf/images_per_s", "perf/data_wait_frac", "mem/max_allocated_gb",
                                    "mem/max_rss_gb")})
    summary = {mode: {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
                      for key in runs[0]} for mode, runs in per_mode.items()}
    ratio = ratio_over_rounds([r["perf/images_per_s"] for r in per_mode["gpu"]],
                              [r["perf/images_per_s"] for r in per_mode["cpu"]])
    return {"per_round": per_mode, "median": summary, "steps": steps, "batch": batch, "workers": workers,
            "image_size": image_size, "student": student,
            "ratios": {"decode_gpu_vs_cpu": ratio},
            "advice": decode_advice(summary)}


def decode_advice(summary: dict) -> str:
    cpu, gpu = summary["cpu"], summary["gpu"]
    wait = cpu["perf/data_wait_frac"]
    faster = gpu["perf/images_per_s"] > cpu["perf/images_per_s"]
    if wait is not None and wait > 0.1 and faster:
        return (f"data.decode=gpu: the CPU path waits {wait:.0%} of the time for data and GPU decode trains "
                f"{gpu['perf/images_per_s'] / cpu['perf/images_per_s']:.2f}x faster")
    return (f"data.decode=cpu: the CPU path waits {wait:.0%} of the time for data"
            + ("" if faster else " and GPU decode is not faster") + " (the rule: gpu when the CPU path waits "
            "more than 10% and GPU decode is faster)")
