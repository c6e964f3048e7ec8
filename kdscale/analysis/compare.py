"""``kdscale compare``: final and best metrics of several runs, and a PNG of a validation
metric against step for all of them.

Runs come from offline wandb run files (a kdscale run dir, its ``wandb`` dir or an
``offline-run-*`` dir; resumed sessions of one run are merged) or, with ``--project``,
from a wandb project online. The plot is drawn with Pillow, so no plotting library is
needed.

The wandb files of a run that was killed are incomplete: the killed session's file may
hold nothing at all, and the resumed session starts at the checkpoint it resumed from.
The trainer's own ``metrics.jsonl`` (one line per logged step, flushed at once) is the
complete record, so where it has steps the wandb history lacks, the history is rebuilt
from it, step by step, with wandb's values kept where both have a step. A run with no
history anywhere is left out with a one-line note instead of showing as an empty row.
"""

from __future__ import annotations

import json
import os
import sys

from kdscale.errors import KdscaleError

METRICS_FILE = "metrics.jsonl"


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
    logged = read_metrics_jsonl(path)
    return {"id": "-", "name": os.path.basename(os.path.abspath(run_dir)), "group": None, "job_type": None,
            "tags": [], "config": {}, "history": [{"_step": s, **logged[s]} for s in sorted(logged)],
            "files": [], "empty_files": [], "run_dir": run_dir, "history_from": path}


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


def summarise(run: dict, metric: str) -> dict:
    points = [(row.get("_step", i), row[metric]) for i, row in enumerate(run["history"]) if metric in row]
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    speeds = [row["perf/images_per_s"] for row in run["history"] if "perf/images_per_s" in row]
    best = max(points, key=lambda p: p[1]) if points else None
    method = run["config"].get("method", {}).get("name") if isinstance(run["config"].get("method"), dict) else None
    return {"run": run.get("name") or run["group"] or run["id"], "id": run["id"], "method": method,
            "final": points[-1][1] if points else None, "best": best[1] if best else None,
            "best_step": best[0] if best else None, "last_step": points[-1][0] if points else None,
            "final_train_loss": losses[-1] if losses else None,
            "images_per_s": sum(speeds) / len(speeds) if speeds else None, "points": points}


def format_table(summaries: list[dict], metric: str) -> str:
    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [("run", "id", "method", f"final {metric}", "best (step)", "final train/loss", "images/s")]
    for s in summaries:
        rows.append((s["run"], s["id"], s["method"] or "-", fmt(s["final"]),
                     f"{fmt(s['best'])} ({s['best_step']})" if s["best"] is not None else "-",
                     fmt(s["final_train_loss"], 4), fmt(s["images_per_s"], 0)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def plot(summaries: list[dict], metric: str, path: str, size=(900, 560)) -> str:
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 220, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for s in summaries for p in s["points"]]
    if not points:
        raise KdscaleError(f"no run logged {metric}; nothing to plot")
    x_max = max(1, max(p[0] for p in points))
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 1, y_max + 1

    def xy(step, value):
        x = left + (width - left - right) * step / x_max
        y = height - bottom - (height - top - bottom) * (value - y_min) / (y_max - y_min)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        value = y_min + (y_max - y_min) * i / 4
        _, y = xy(0, value)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((5, y - 6), f"{value:.1f}", fill="black")
        step = x_max * i / 4
        x, _ = xy(step, y_min)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((left, 12), f"{metric} vs step", fill="black")
    draw.text(((width - right) // 2, height - 20), "step", fill="black")
    for index, summary in enumerate(summaries):
        color = COLORS[index % len(COLORS)]
        line = [xy(*p) for p in summary["points"]]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((width - right + 10, top + 18 * index), f"{summary['run']} ({summary['id']})", fill=color)
    image.save(path)
    return path
