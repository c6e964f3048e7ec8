"""``kdscale summary``: the end-of-run table of finished runs, from each run dir's
``summary.json``, with what the runs train read from ``run.json`` (or the wandb config)
and the best epoch and the throughput read from ``metrics.jsonl``, by the same functions
as ``kdscale compare`` (:func:`kdscale.analysis.runinfo.images_per_s`), so both print the
same images/s for the same run.
"""

from __future__ import annotations

import json
import os

from kdscale.analysis.compare import (
    METRICS_FILE,
    fmt,
    fmt_epoch,
    jsonl_history,
    markdown_table,
    read_run_json,
    summarise,
)
from kdscale.errors import KdscaleError


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise KdscaleError(f"{run_dir}: no summary.json (the run has not finished, or this is not a run directory)")
    with open(path) as fh:
        return json.load(fh)


def _run_config(run_dir: str) -> dict:
    config = read_run_json(run_dir)
    if config:
        return config
    from kdscale.analysis.wandb_files import read_runs

    try:
        runs = [r for r in read_runs(run_dir) if r.get("job_type") in ("train", None)]
    except (OSError, ValueError):
        return {}
    return runs[0]["config"] if len(runs) == 1 else {}


def summarise_run_dir(run_dir: str) -> dict:
    """summary.json's facts plus the compare summary of the run's ``metrics.jsonl``."""
    summary = read_summary(run_dir)
    path = os.path.join(run_dir, METRICS_FILE)
    run = {"id": "-", "name": summary.get("experiment"), "config": _run_config(run_dir), "run_dir": run_dir,
           "history": jsonl_history(path) if os.path.isfile(path) else [],
           "metrics_jsonl": path if os.path.isfile(path) else None}
    return {**summary, "compare": summarise(run, "val/student_top1")}


def format_summary_table(summaries: list[dict]) -> str:
    rows = [("run", "method", "network", "steps", "top-1 (%)", "best top-1 (%) @ epoch", "teacher top-1 (%)",
             "agreement (%)", "images/s")]
    for s in summaries:
        m, c = s.get("metrics") or {}, s["compare"]

        def pct(key, m=m):
            return f"{m[key]:.2f}" if key in m else "-"

        best = f"{fmt(c['best'])} @ {fmt_epoch(c['best_epoch'], c['best_step'])}" if c["best"] is not None else "-"
        network = c["networks"] if c["student"] else ("(alone)" if s.get("method") == "vanilla" else "-")
        rows.append((s["experiment"], s["method"], network, f"{s['step']}/{s['total_steps']}",
                     pct("val/student_top1"), best, pct("val/teacher_top1"), pct("val/agreement_top1"),
                     fmt(c["images_per_s"], 0)))
    details = []
    for s in summaries:
        details.append(f"- {s['experiment']}: run {s['run_dir']}, checkpoint {s.get('checkpoint')}"
                       + (f", export {s['export']}" if s.get("export") else ""))
        if s.get("wandb_sync"):
            details.append(f"  wandb (offline): {s['wandb_sync']}")
    note = ("top-1: the network the run trains (the student; for vanilla, the network alone) at the last epoch; "
            "images/s: median of the logged windows after the first (as kdscale compare)")
    return "\n".join([markdown_table(rows), "", note, ""] + details)
