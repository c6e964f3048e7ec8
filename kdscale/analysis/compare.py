"""``kdscale compare``: last and best metrics of several runs (or of groups of runs over
seeds, next to the published figure), and a plot of a metric against epochs, images seen
or steps (:mod:`kdscale.analysis.plots`).

Runs come from offline wandb run files (a kdscale run dir, its ``wandb`` dir or an
``offline-run-*`` dir; resumed sessions of one run are merged), from a run dir's
``metrics.jsonl`` alone (``wandb.mode=disabled``) or, with ``--project``, from a wandb
project online.

The wandb files of a run that was killed are incomplete: the killed session's file may
hold nothing at all, and the resumed session starts at the checkpoint it resumed from.
The trainer's own ``metrics.jsonl`` (one line per logged step, flushed at once) is the
complete record, so where it has steps the wandb history lacks, the history is rebuilt
from it, step by step, with wandb's values kept where both have a step. A run with no
history anywhere is left out with a one-line note instead of showing as an empty row.

What a run is (method, seed, student, teacher, dataset) comes from its config: the
top-level keys the tracker writes (:func:`kdscale.runtime.tracking.run_config`), or the
config sections of runs recorded before those keys existed.
"""

from __future__ import annotations

import json
import os
import sys

from kdscale.errors import KdscaleError

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # written by kdscale.runtime.tracking


def _note(text: str) -> None:
    print(f"kdscale compare: {text}", file=sys.stderr, flush=True)


def read_metrics_jsonl(path: str) -> dict[int, dict]:
    """Step -> metrics, from the trainer's ``metrics.jsonl`` (``{"step": N, **metrics}``
    per ``Tracker.log`` call; see :mod:`kdscale.runtime.tracking`).

    Lines sharing a step (train and validation metrics are logged separately; a resumed
    run logs again the steps after its checkpoint) are merged, later values winning, as
    in wandb. A torn line (the writer killed mid-line) is skipped. Lines with ``teach/``
    metrics come from a ``kdscale teach`` job that shared the run dir and are left out.
    """
    steps: dict[int, dict] = {}
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                continue
            if any(key.startswith("teach/") for key in row):
                continue
            step = row.pop("step")
            steps.setdefault(step, {}).update(row)
    return steps


def fill_from_metrics_jsonl(runs: list[dict]) -> None:
    """Rebuild the history of runs whose run dir's ``metrics.jsonl`` has steps their wandb
    files lack. The file holds no run id, so it is used only where exactly one training
    run (job type ``train``, or unknown for a session killed before it said) lives in
    that run dir."""
    by_dir: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("run_dir") and run.get("job_type") in ("train", None):
            by_dir.setdefault(run["run_dir"], []).append(run)
    for run_dir, candidates in by_dir.items():
        path = os.path.join(run_dir, METRICS_FILE)
        if len(candidates) != 1 or not os.path.isfile(path):
            continue
        run = candidates[0]
        run["metrics_jsonl"] = path  # this run's own record: its throughput is read from here
        if any("_step" not in row for row in run["history"]):
            continue  # rows that cannot be placed by step: keep wandb's history as it is
        logged = read_metrics_jsonl(path)
        if not set(logged) - {row["_step"] for row in run["history"]}:
            continue
        rows = {step: {"_step": step, **metrics} for step, metrics in logged.items()}
        for row in run["history"]:
            rows.setdefault(row["_step"], {}).update(row)
        run["history"] = [rows[step] for step in sorted(rows)]
        run["history_from"] = path


def run_from_metrics_jsonl(run_dir: str) -> dict | None:
    """A run tracked without wandb (``wandb.mode=disabled``): its history from ``metrics.jsonl``."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    config = read_run_json(run_dir)
    return {"id": config.get("wandb_run_id") or "-", "name": os.path.basename(os.path.abspath(run_dir)),
            "group": None, "job_type": None, "tags": [], "config": config, "history": jsonl_history(path),
            "files": [], "empty_files": [], "run_dir": run_dir, "history_from": path, "metrics_jsonl": path}


def jsonl_history(path: str) -> list[dict]:
    """``metrics.jsonl`` as history rows (``{"_step": N, ...}``, by step)."""
    logged = read_metrics_jsonl(path)
    return [{"_step": step, **logged[step]} for step in sorted(logged)]


def read_run_json(run_dir: str) -> dict:
    """The run's config as the tracker wrote it beside ``metrics.jsonl`` (``run.json``), or {}."""
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def runs_from_dirs(paths: list[str], note=_note) -> list[dict]:
    """The runs under ``paths`` that logged at least one step."""
    from kdscale.analysis.wandb_files import read_runs

    runs = []
    for path in paths:
        found = read_runs(path)
        if not found:
            alone = run_from_metrics_jsonl(path)
            if alone is None:
                raise KdscaleError(f"{path}: no wandb run files (run-*.wandb) and no {METRICS_FILE} found; "
                                   f"is this a kdscale run directory?")
            found = [alone]
        fill_from_metrics_jsonl(found)
        for run in found:
            if run["history"]:
                runs.append(run)
                continue
            sessions = ", ".join(os.path.basename(os.path.dirname(f)) for f in run["empty_files"]) or "none"
            note(f"skipped run {run['id']} in {path}: no history in its wandb sessions ({sessions}; killed before "
                 f"wandb wrote any?) nor in a {METRICS_FILE} of its run dir")
    if not runs:
        raise KdscaleError(f"no run under {', '.join(paths)} logged any step; nothing to compare")
    return runs


def runs_from_project(project: str) -> list[dict]:  # pragma: no cover - needs a wandb server
    import wandb

    out = []
    for run in wandb.Api().runs(project):
        out.append({"id": run.id, "name": run.name, "group": run.group, "job_type": run.job_type, "tags": run.tags,
                    "config": dict(run.config), "history": list(run.scan_history())})
    return out


def summarise(run: dict, metric: str, best: str | None = None) -> dict:
    """A run's last and best value of ``metric`` (best by the metric's direction), where
    (step, epoch), its last training loss and its throughput (:func:`images_per_s`)."""
    from kdscale.analysis.runinfo import (
        best_point,
        direction,
        images_per_s,
        metric_points,
        networks,
        run_keys,
        run_label,
        run_name,
        steps_per_epoch,
    )

    way = direction(metric, best)
    points = metric_points(run, metric)
    top = best_point(points, way)
    losses = metric_points(run, "train/loss")
    per_epoch = steps_per_epoch(run)
    jsonl = run.get("metrics_jsonl")
    history = jsonl_history(jsonl) if jsonl and os.path.isfile(jsonl) else run["history"]

    def epoch(step):
        return step / per_epoch if per_epoch and step is not None else None

    last_step = points[-1][0] if points else None
    return {"run": run_name(run), "id": run["id"], **run_keys(run), "label": run_label(run),
            "networks": networks(run), "metric": metric, "direction": way,
            "final": points[-1][1] if points else None, "last_step": last_step, "last_epoch": epoch(last_step),
            "best": top[1] if top else None, "best_step": top[0] if top else None,
            "best_epoch": epoch(top[0]) if top else None, "final_train_loss": losses[-1][1] if losses else None,
            "images_per_s": images_per_s(history), "points": points}


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_epoch(epoch: float | None, step: int | None = None) -> str:
    if epoch is None:
        return "-" if step is None else f"step {step}"
    return f"{epoch:.0f}" if abs(epoch - round(epoch)) < 1e-6 else f"{epoch:.2f}"


def markdown_table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_table(summaries: list[dict], metric: str) -> str:
    """One row per run: the last value of the metric (the last epoch: what to report) and the
    best one apart, with its epoch (best by the metric's direction, shown in the header)."""
    from kdscale.analysis.runinfo import metric_short

    short = metric_short(metric)
    way = summaries[0]["direction"] if summaries else "max"
    digits = 2 if short.endswith("(%)") or metric.endswith(("_top1", "_top5")) else 4
    loss_column = metric != "train/loss"
    rows = [("run", "id", "method", "network", "seed", "epoch", f"last {short}", f"best {short} ({way}) @ epoch",
             *(["last train/loss"] if loss_column else []), "images/s")]
    for s in summaries:
        best = (f"{fmt(s['best'], digits)} @ {fmt_epoch(s['best_epoch'], s['best_step'])}"
                if s["best"] is not None else "-")
        rows.append((s["run"], s["id"], s["method"] or "-", s["networks"], "-" if s["seed"] is None else s["seed"],
                     fmt_epoch(s["last_epoch"], s["last_step"]), fmt(s["final"], digits), best,
                     *([fmt(s["final_train_loss"], 4)] if loss_column else []), fmt(s["images_per_s"], 0)))
    return markdown_table(rows)
