"""What a recorded run is and how to read its metrics: its keys (method, seed, student,
teacher, dataset), the label of a metric and its direction (is higher better?), the
x axis in epochs, images seen or steps, and its throughput, the one images/s definition
``kdscale compare`` and ``kdscale summary`` share (:func:`images_per_s`).

A run is the dict :mod:`kdscale.analysis.compare` reads (``config``, ``history`` rows with
``_step``, ``run_dir``, ...).
"""

from __future__ import annotations

import json
import math
import os
import statistics

from kdscale.errors import KdscaleError

KEYS = ("method", "seed", "student", "teacher", "dataset")
X_AXES = ("epochs", "images", "steps")
THROUGHPUT = "perf/images_per_s"


# -- what a run is ---------------------------------------------------------------------
def _summary_json(run: dict) -> dict:
    path = os.path.join(run["run_dir"], "summary.json") if run.get("run_dir") else None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (TypeError, OSError, json.JSONDecodeError):
        return {}


def run_keys(run: dict) -> dict:
    """method, seed, student, teacher, dataset (None where unknown), from the top-level
    config keys the tracker writes, or the config sections of runs recorded before them."""
    cfg = run.get("config") or {}
    experiment = cfg.get("experiment") if isinstance(cfg.get("experiment"), dict) else {}

    def name_of(key):
        value = cfg.get(key)
        if not isinstance(value, dict):
            return value
        if key == "method" and value.get("logit_standardization") and value.get("name"):
            return f"{value['name']}+ls"  # as kdscale.runtime.tracking.method_label names it
        return value.get("name")

    keys = {"method": name_of("method"), "seed": cfg.get("seed", experiment.get("seed")),
            "student": name_of("student"), "teacher": name_of("teacher"),
            "dataset": cfg.get("dataset", experiment.get("dataset"))}
    if keys["method"] is None:
        keys["method"] = _summary_json(run).get("method")
    return keys


def config_value(run: dict, key: str):
    """A grouping key: one of :data:`KEYS`, or a dotted config path (``optim.lr``)."""
    if key in KEYS:
        return run_keys(run)[key]
    value = run.get("config") or {}
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def run_name(run: dict) -> str:
    return run.get("name") or run.get("group") or run["id"]


def networks(run: dict) -> str:
    """The networks of a run, by role: ``resnet8x4 <- resnet32x4`` for a student taught by a
    teacher, ``resnet32x4 (alone)`` for a vanilla run (the network trained on its own,
    often to become a teacher)."""
    keys = run_keys(run)
    student = keys["student"] or "?"
    if keys["method"] == "vanilla":
        return f"{student} (alone)"
    return f"{student} <- {keys['teacher']}" if keys["teacher"] else student


def run_label(run: dict) -> str:
    """A legend entry: the run's name and what it trains."""
    keys = run_keys(run)
    if keys["method"] == "vanilla":
        return f"{run_name(run)} ({keys['student'] or 'network'} alone, vanilla)"
    return f"{run_name(run)} ({keys['method']})" if keys["method"] else run_name(run)


# -- metrics ----------------------------------------------------------------------------
_LABELS = {"train/loss": "training loss", "train/lr": "learning rate", THROUGHPUT: "throughput (images/s)",
           "perf/data_wait_frac": "time waiting for data (fraction)", "mem/max_rss_gb": "peak host memory (GiB)",
           "mem/max_allocated_gb": "peak GPU memory (GiB)", "val/agreement_top1": "student-teacher top-1 agreement (%)"}


def metric_label(metric: str) -> str:
    """An axis label with units: ``val/student_top1`` -> ``validation top-1 accuracy (%)``
    (the trained network's, whatever its role); other networks are named."""
    if metric in _LABELS:
        return _LABELS[metric]
    if metric.startswith("train/loss_"):
        return f"training loss: {metric[len('train/loss_'):]}"
    if metric.startswith("val/"):
        for suffix, what in (("_top1", "top-1"), ("_top5", "top-5")):
            if metric.endswith(suffix):
                network = metric[len("val/"):-len(suffix)]
                return f"validation {what} accuracy (%)" + ("" if network == "student" else f", {network}")
    return metric


def metric_short(metric: str) -> str:
    """A table header: ``top-1 (%)``, ``teacher top-1 (%)``, ``train/loss`` ..."""
    if metric.startswith("val/") and metric.endswith(("_top1", "_top5")) and metric != "val/agreement_top1":
        network, k = metric[len("val/"):-len("_top1")], metric[-1]
        return ("" if network == "student" else f"{network} ") + f"top-{k} (%)"
    return metric


def direction(metric: str, override: str | None = None) -> str:
    """``max`` (accuracy, top-1/top-5, agreement, throughput) or ``min`` (loss, error, wait)."""
    if override:
        return override
    low = metric.lower()
    if any(word in low for word in ("loss", "error", "wait", "nll")):
        return "min"
    return "max"


def best_point(points: list[tuple[float, float]], way: str) -> tuple[float, float] | None:
    """The best (x, value) by direction, the earliest of ties; non-finite values never win."""
    finite = [p for p in points if isinstance(p[1], (int, float)) and math.isfinite(p[1])]
    if not finite:
        return None
    return (max if way == "max" else min)(finite, key=lambda p: p[1])  # the first of equals


def metric_points(run: dict, metric: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, one per step (a resumed session's later value wins)."""
    by_step: dict[int, float] = {}
    for index, row in enumerate(run["history"]):
        value = row.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[row.get("_step", index)] = float(value)
    return sorted(by_step.items())


def images_per_s(history: list[dict]) -> float | None:
    """A run's training throughput, the one definition ``kdscale compare`` and ``kdscale
    summary`` both print: the median of the ``perf/images_per_s`` windows the trainer
    logged (images of every rank over the window's wall time, one window per
    ``train.log_every_steps``), one per step (a resumed session's later value wins), the
    first window (start-up: loader workers, cuDNN autotuning, compilation) left out when
    there are others. The median keeps a window that held a validation pass or a
    checkpoint from pulling the figure. Both commands read it from the run dir's
    ``metrics.jsonl`` where the run has one, else from its wandb history."""
    values = [value for _, value in metric_points({"history": history}, THROUGHPUT)]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


# -- the x axis -------------------------------------------------------------------------
def global_batch(run: dict) -> int | None:
    """Images per optimizer step (``data.batch_size`` x processes x ``train.grad_accum_steps``)."""
    cfg = run.get("config") or {}
    if isinstance(cfg.get("global_batch"), int):
        return cfg["global_batch"]
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    world = cfg.get("world_size") or _summary_json(run).get("world_size")
    if isinstance(data.get("batch_size"), int) and isinstance(world, int):
        return data["batch_size"] * world * int(train.get("grad_accum_steps") or 1)
    return None


def steps_per_epoch(run: dict) -> float | None:
    """From the validation rows (logged at the end of epoch ``epoch``, at step
    ``epoch x steps per epoch``), else from the config's sample count and global batch."""
    for row in reversed(run["history"]):
        epoch = row.get("epoch")
        if isinstance(epoch, (int, float)) and epoch > 0 and isinstance(row.get("_step"), int):
            return row["_step"] / epoch
    samples, batch = ((run.get("config") or {}).get("data") or {}).get("train_samples"), global_batch(run)
    if isinstance(samples, int) and batch:
        return max(1, samples // batch)
    return None


def x_scale(run: dict, x: str) -> float:
    """What one optimizer step is worth on the ``x`` axis (epochs, images or steps)."""
    if x == "steps":
        return 1.0
    if x == "epochs":
        per_epoch = steps_per_epoch(run)
        if per_epoch:
            return 1.0 / per_epoch
        raise KdscaleError(f"run {run_name(run)}: cannot tell its steps per epoch (no validation logged yet and no "
                           f"data.train_samples in its config); use --x steps")
    if x == "images":
        batch = global_batch(run)
        if batch:
            return float(batch)
        raise KdscaleError(f"run {run_name(run)}: cannot tell its global batch (no global_batch, or "
                           f"data.batch_size and world size, in its config); use --x epochs or --x steps")
    raise KdscaleError(f"--x {x}: use one of {', '.join(X_AXES)}")


X_LABELS = {"epochs": "epoch", "images": "images seen", "steps": "optimizer step"}
