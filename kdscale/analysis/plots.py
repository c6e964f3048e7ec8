"""The ``kdscale compare --plot`` figure, drawn with matplotlib (Agg, no display needed).

A metric against epochs (default), images seen or optimizer steps, one line per run, or
with ``--group-by`` one line per group: the mean over its seeds with a band of one
standard deviation. Labelled axes with units, gridlines, a legend, fonts that stay
readable at a paper's column width, and the frozen teacher's accuracy as a dashed line
where the runs logged ``val/teacher_top1`` (``val/teacher_top5`` for a top-5 plot).
``--smooth W`` draws an exponential moving average (weight W, debiased as TensorBoard
does) over the faint raw curve, for noisy training losses. The format follows the file's
suffix: ``.png`` (200 dpi), ``.pdf`` (TrueType fonts embedded) or ``.svg``.
"""

from __future__ import annotations

import math
import os

from kdscale.analysis.runinfo import (
    X_LABELS,
    metric_label,
    metric_points,
    run_keys,
    run_label,
    run_name,
    x_scale,
)
from kdscale.errors import KdscaleError

FORMATS = (".png", ".pdf", ".svg")
STYLE = {"font.size": 11, "axes.labelsize": 11, "axes.titlesize": 12, "legend.fontsize": 9,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False,
         "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "savefig.dpi": 200}


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased (the first values are not pulled towards 0)."""
    if not 0 <= weight < 1:
        raise KdscaleError(f"--smooth {weight}: the EMA weight must be in [0, 1)")
    out, acc = [], 0.0
    for i, value in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * value
        out.append(acc / (1 - weight ** i))
    return out


def run_series(runs: list[dict], metric: str, x: str) -> list[dict]:
    """One series per run that logged the metric: {"label", "x", "y"} (finite points only)."""
    series = []
    for run in runs:
        points = [(step, value) for step, value in metric_points(run, metric) if math.isfinite(value)]
        if points:
            scale = x_scale(run, x)
            series.append({"label": run_label(run), "x": [s * scale for s, _ in points], "y": [v for _, v in points]})
    return series


def group_series(groups: list[dict], keys: list[str], metric: str, x: str) -> list[dict]:
    """One series per group: the mean over its runs at the x values all of them logged,
    with the sample standard deviation where there are two runs or more."""
    series = []
    for group in groups:
        curves = []
        for run in group["runs"]:
            scale = x_scale(run, x)
            curves.append({round(s * scale, 9): v for s, v in metric_points(run, metric) if math.isfinite(v)})
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not common:
            continue
        means, stds = [], []
        for at in common:
            values = [c[at] for c in curves]
            mean = sum(values) / len(values)
            means.append(mean)
            stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0)
        name = ", ".join(f"{k}={'-' if v is None else v}" for k, v in zip(keys, group["key"]))
        series.append({"label": f"{name} (n={len(curves)})", "x": common, "y": means,
                       "std": stds if len(curves) > 1 else None})
    return series


def _frozen_teacher(run: dict, key: str) -> bool:
    method = run_keys(run)["method"]
    try:
        from kdscale.methods import get_method_class

        return get_method_class(method.split("+")[0]).teacher_role == "frozen"  # kd+ls: kd
    except Exception:  # noqa: BLE001 - an unknown or custom method: a frozen teacher scores the same each time
        values = {round(v, 6) for _, v in metric_points(run, key)}
        return len(values) == 1


def _teachers(run: dict) -> list[tuple[str, str]]:
    """(id, name) of the run's teachers: its config's ``teachers`` list, else the one teacher
    of a run recorded before there could be several (``val/teacher_*``); and the ensemble
    where there are several."""
    listed = [t for t in (run.get("config") or {}).get("teachers") or [] if isinstance(t, dict)]
    found = [(t.get("id") or "teacher", t.get("name") or "") for t in listed] or [("teacher", "")]
    return found + ([("ensemble", "ensemble of " + " + ".join(n for _, n in found))] if len(found) > 1 else [])


def teacher_references(runs: list[dict], metric: str) -> list[tuple[str, float]]:
    """(label, value) of each distinct frozen teacher's accuracy in the runs (every teacher of a
    run with several, ``val/<id>_top1``, and their ensemble), for a top-1 (top-5) metric of
    another network."""
    suffix = "_top1" if metric.endswith("_top1") else "_top5" if metric.endswith("_top5") else None
    if suffix is None or metric.startswith("val/agreement") or not metric.startswith("val/"):
        return []
    refs: dict[tuple, tuple[str, float]] = {}
    for run in runs:
        several = len(_teachers(run)) > 1
        for tid, name in _teachers(run):
            key = f"val/{tid}{suffix}"
            points = metric_points(run, key) if key != metric else []
            if not points or not _frozen_teacher(run, key):
                continue
            value = points[-1][1]
            teacher = name if several else run_keys(run)["teacher"]
            label = (f"teacher {teacher}" if tid != "ensemble" else teacher) if teacher else \
                f"teacher of {run_name(run)}"
            refs.setdefault((teacher, round(value, 2)), (f"{label}: {value:.2f}%", value))
    return list(refs.values())


def make_figure(series: list[dict], metric: str, x: str, references=(), smooth: float = 0.0,
                title: str | None = None):
    """The figure (a matplotlib ``Figure`` on an Agg canvas, its legend ``fig.legends[0]``
    under the axes), not yet saved."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    if not series:
        raise KdscaleError(f"no run logged {metric}; nothing to plot")
    names = [s["label"] + (f", EMA {smooth:g}" if smooth else "") for s in series] + [r[0] for r in references]
    columns = 2 if len(names) > 2 and max(map(len, names)) <= 38 else 1
    rows = -(-len(names) // columns)
    with matplotlib.rc_context(STYLE):  # the legend goes under the axes: the figure grows with it
        fig = Figure(figsize=(6.4, 3.9 + 0.24 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, s in enumerate(series):
            color = colors[index % len(colors)]
            marker = "o" if len(s["x"]) <= 60 and not smooth else None
            if smooth:
                ax.plot(s["x"], s["y"], color=color, alpha=0.25, linewidth=1)
                ax.plot(s["x"], ema(s["y"], smooth), color=color, linewidth=1.8, label=f"{s['label']}, EMA {smooth:g}")
            else:
                ax.plot(s["x"], s["y"], color=color, linewidth=1.8, marker=marker, markersize=3.5, label=s["label"])
            if s.get("std"):
                low = [m - d for m, d in zip(s["y"], s["std"])]
                high = [m + d for m, d in zip(s["y"], s["std"])]
                ax.fill_between(s["x"], low, high, color=color, alpha=0.18, linewidth=0)
        for label, value in references:
            ax.axhline(value, color="0.25", linestyle="--", linewidth=1.2, label=label)
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(metric_label(metric))
        if x == "images":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.set_xlim(left=0)
        ax.grid(True, which="major", color="0.85", linewidth=0.8)
        ax.set_axisbelow(True)
        # Under the axes, never over a curve; two columns while the entries are short.
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False)
        if title:
            ax.set_title(title)
    return fig


def save_figure(fig, path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise KdscaleError(f"--plot {path}: give a file name ending in {', '.join(FORMATS)} (the format)")
    import matplotlib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig.savefig(path, bbox_inches="tight")
    return path


def plot(runs: list[dict], metric: str, path: str, x: str = "epochs", smooth: float = 0.0,
         groups: list[dict] | None = None, keys: list[str] | None = None, title: str | None = None):
    """Draw and save; returns the figure (its axes, lines and legend can be inspected)."""
    if os.path.splitext(path)[1].lower() not in FORMATS:
        save_figure(None, path)  # says which suffixes, before anything is drawn
    series = group_series(groups, keys or [], metric, x) if groups else run_series(runs, metric, x)
    fig = make_figure(series, metric, x, teacher_references(runs, metric), smooth, title)
    save_figure(fig, path)
    return fig
