"""``kdscale compare --group-by``: runs grouped by their keys (``method``, ``student``,
``teacher``, ``dataset`` or any dotted config path), and per group the mean and standard
deviation over seeds of the last-epoch and the best-epoch value of the metric, the number
of seeds, and the published figure where kdscale ships one
(:mod:`kdscale.analysis.references`).

The last epoch is what to report (mdistiller's users asked which one a paper's number
is); the best epoch is shown apart. The standard deviation is the sample one (n - 1), as
"mean +- std over seeds" is usually given; one seed has none. A group whose runs end at
different epochs (one still running, or killed) or repeat a seed is pointed out under the
table.
"""

from __future__ import annotations

import statistics

from kdscale.analysis.compare import fmt_epoch, markdown_table
from kdscale.analysis.references import Reference, cite, lookup
from kdscale.analysis.runinfo import config_value, metric_short, run_keys, run_name

PUBLISHED_METRIC = "val/student_top1"


def parse_keys(text: str) -> list[str]:
    """``method,student,teacher`` -> ``["method", "student", "teacher"]``."""
    return [key.strip() for key in text.split(",") if key.strip()]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _single(values: list) -> object:
    """The value every run of a group shares, or None."""
    distinct = set(values)
    return values[0] if len(distinct) == 1 else None


def group_runs(runs: list[dict], summaries: list[dict], keys: list[str]) -> list[dict]:
    """Groups in order of first appearance: ``{"key": (values...), "runs": [...], "summaries": [...]}``."""
    groups: dict[tuple, dict] = {}
    for run, summary in zip(runs, summaries):
        key = tuple(config_value(run, k) for k in keys)
        group = groups.setdefault(key, {"key": key, "runs": [], "summaries": []})
        group["runs"].append(run)
        group["summaries"].append(summary)
    return list(groups.values())


def group_stats(group: dict, metric: str) -> dict:
    """The group's statistics over its runs (seeds) and its published figure, if any."""
    summaries = group["summaries"]
    last_mean, last_std = mean_std([s["final"] for s in summaries])
    best_mean, best_std = mean_std([s["best"] for s in summaries])
    run_keys_list = [run_keys(run) for run in group["runs"]]
    shared = {k: _single([keys[k] for keys in run_keys_list]) for k in ("dataset", "method", "teacher", "student")}
    reference = lookup(**shared) if metric == PUBLISHED_METRIC else None
    seeds = [keys["seed"] for keys in run_keys_list]
    epochs = sorted({fmt_epoch(s["last_epoch"], s["last_step"]) for s in summaries})
    return {"key": group["key"], "n": sum(s["final"] is not None for s in summaries),
            "missing": [s["run"] for s in summaries if s["final"] is None], "direction": summaries[0]["direction"], "seeds": seeds, "epochs": epochs,
            "last_mean": last_mean, "last_std": last_std, "best_mean": best_mean, "best_std": best_std,
            "reference": reference,
            "delta": last_mean - reference.top1 if reference is not None and last_mean is not None else None,
            "runs": [run_name(run) for run in group["runs"]]}


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± -"


def format_groups(stats: list[dict], keys: list[str], metric: str) -> str:
    """The table, the sources of the published figures under it, and notes on odd groups."""
    short = metric_short(metric)
    way = stats[0]["direction"] if stats else "max"
    rows = [(*keys, "seeds", "epoch", f"last {short} mean ± std", f"best {short} mean ± std", "published",
             "last - published")]
    refs: list[Reference] = []
    notes = []
    for s in stats:
        published = "-"
        if s["reference"] is not None:
            if s["reference"] not in refs:
                refs.append(s["reference"])
            published = f"{s['reference'].top1:.2f} [{refs.index(s['reference']) + 1}]"
        delta = "-" if s["delta"] is None else f"{s['delta']:+.2f}"
        rows.append((*("-" if v is None else str(v) for v in s["key"]), str(s["n"]), "/".join(s["epochs"]),
                     _pm(s["last_mean"], s["last_std"]), _pm(s["best_mean"], s["best_std"]), published, delta))
        name = ", ".join(f"{k}={v}" for k, v in zip(keys, s["key"]))
        if len(s["epochs"]) > 1:
            notes.append(f"{name}: runs end at different epochs ({', '.join(s['epochs'])}); one has not finished?")
        if s["missing"]:
            notes.append(f"{name}: left out, no {metric} logged: {', '.join(s['missing'])}")
        known = [seed for seed in s["seeds"] if seed is not None]
        if len(set(known)) < len(known):
            notes.append(f"{name}: a seed repeats ({', '.join(map(str, s['seeds']))}; runs {', '.join(s['runs'])})")
    lines = [markdown_table(rows), "",
             f"mean ± sample std (n - 1) over the seeds of each group; best by {way} of {metric} per run"]
    lines += [f"[{i}] {cite(ref)}" for i, ref in enumerate(refs, 1)]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
