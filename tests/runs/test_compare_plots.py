"""`kdscale compare` and `kdscale summary` as a researcher publishes them: the matplotlib
figure (axes, units, legend, the frozen teacher's line, smoothing, PNG/PDF), best by the
metric's direction, mean +- std over seeds next to the published figure, one images/s in
both commands, and wandb's top-level keys.

Most runs here are written by the test in the trainer's own formats (``metrics.jsonl``
lines as ``Tracker.log`` writes them, ``summary.json`` as ``Trainer._finish`` writes it,
``run.json`` from the tracker's ``run_config``); one slow test trains real tiny runs."""

from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np
import pytest
from helpers.common import make_config

from kdscale.analysis.compare import runs_from_dirs, summarise
from kdscale.analysis.plots import ema, plot
from kdscale.analysis.runinfo import images_per_s
from kdscale.cli import main as cli
from kdscale.config import load_config
from kdscale.config.loader import config_to_dict
from kdscale.runtime.tracking import run_config

STEPS_PER_EPOCH, BATCH = 10, 64


def fake_run(root, name, method="kd", seed=0, top1=(40.0, 55.0, 60.0), teacher_top1=None, student="resnet8x4",
             teacher="resnet32x4", dataset="cifar100", speeds=None, losses=None, extra=()):
    """A finished run dir as the trainer leaves it (wandb disabled): training windows every
    5 steps, validation at each epoch's end."""
    run_dir = os.path.join(root, name)
    overrides = [f"experiment.name={name}", f"experiment.output_dir={root}", f"experiment.dataset={dataset}",
                 f"experiment.seed={seed}", f"method.name={method}", f"student.name={student}",
                 "data.train_shards=x/train-*.tar", "data.val_shards=x/val-*.tar", "data.num_classes=100",
                 f"data.batch_size={BATCH}", "wandb.mode=disabled", *extra]
    if teacher and method != "vanilla":
        overrides.append(f"teacher.name={teacher}")
    cfg = load_config(None, overrides)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "run.json"), "w") as fh:
        json.dump({**run_config(cfg, config_to_dict(cfg), world_size=1), "wandb_run_id": None}, fh)
    epochs = len(top1)
    steps = list(range(5, epochs * STEPS_PER_EPOCH + 1, 5))
    speeds = speeds or [1000.0 + 10 * i for i in range(len(steps))]
    losses = losses or [4.0 / (1 + i) for i in range(len(steps))]
    last = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for i, step in enumerate(steps):
            window = {"train/loss_ce": losses[i], "train/loss": losses[i], "train/lr": 0.05,
                      "train/epoch": (step - 1) // STEPS_PER_EPOCH, "perf/images_per_s": speeds[i],
                      "data/skipped_samples": 0.0, "perf/data_wait_frac": 0.1, "mem/max_rss_gb": 1.0}
            fh.write(json.dumps({"step": step, **window}) + "\n")
            if step % STEPS_PER_EPOCH == 0:
                epoch = step // STEPS_PER_EPOCH
                last = {"val/samples": 1000.0, "val/skipped_samples": 0.0, "val/student_top1": top1[epoch - 1],
                        "val/student_top5": min(100.0, top1[epoch - 1] + 20)}
                if teacher_top1 is not None:
                    last.update({"val/teacher_top1": teacher_top1, "val/teacher_top5": 95.0,
                                 "val/agreement_top1": top1[epoch - 1] + 5})
                fh.write(json.dumps({"step": step, **last, "epoch": epoch}) + "\n")
    summary = {"run_dir": run_dir, "experiment": name, "method": method, "strategy": "ddp", "step": steps[-1],
               "total_steps": steps[-1], "epoch": epochs, "completed": True, "images_per_s": speeds[-1],
               "metrics": last, "checkpoint": None, "wandb_mode": "disabled", "wandb_sync": None, "world_size": 1,
               "ranks_agree": True, "preempted": False, "stopped_by": None, "error": None, "nonfinite_skipped": 0}
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh)
    return run_dir


def table_rows(text, first_column):
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    header = rows[0]
    return {row[header.index(first_column)]: dict(zip(header, row)) for row in rows[1:]}


def test_plot_is_a_figure_people_publish(tmp_path):
    kd = fake_run(str(tmp_path), "kd-s0", teacher_top1=75.25)
    kd1 = fake_run(str(tmp_path), "kd-s1", seed=1, top1=(41.0, 54.0, 61.0), teacher_top1=75.25)
    vanilla = fake_run(str(tmp_path), "teacher-r32x4", method="vanilla", student="resnet32x4", top1=(45.0, 66.0, 75.25))
    runs = runs_from_dirs([kd, kd1, vanilla])
    png = tmp_path / "out" / "top1.png"
    fig = plot(runs, "val/student_top1", str(png))
    [ax] = fig.axes
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "validation top-1 accuracy (%)"
    assert ax.xaxis.get_gridlines()[0].get_visible() and ax.yaxis.get_gridlines()[0].get_visible()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["kd-s0 (kd)", "kd-s1 (kd)", "teacher-r32x4 (resnet32x4 alone, vanilla)",
                      "teacher resnet32x4: 75.25%"]
    assert not any("student" in entry for entry in legend)  # the vanilla network is labelled by its role
    lines = {line.get_label(): line for line in ax.get_lines()}
    reference = lines["teacher resnet32x4: 75.25%"]
    assert reference.get_linestyle() == "--" and set(reference.get_ydata()) == {75.25}
    assert list(lines["kd-s0 (kd)"].get_xdata()) == [1.0, 2.0, 3.0]  # epochs
    assert list(lines["kd-s0 (kd)"].get_ydata()) == [40.0, 55.0, 60.0]
    assert ax.xaxis.label.get_fontsize() >= 10 and ax.get_xticklabels()[0].get_fontsize() >= 9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert min(Image.open(png).size) > 500

    pdf = tmp_path / "top1.pdf"
    fig = plot(runs, "val/student_top1", str(pdf), x="images")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    [ax] = fig.axes
    assert ax.get_xlabel() == "images seen"
    line = [ln for ln in ax.get_lines() if ln.get_label() == "kd-s0 (kd)"][0]
    assert list(line.get_xdata()) == [s * BATCH for s in (10, 20, 30)]  # steps x global batch

    fig = plot(runs, "val/student_top1", str(tmp_path / "steps.png"), x="steps")
    assert fig.axes[0].get_xlabel() == "optimizer step"
    with pytest.raises(Exception, match="ending in .png, .pdf, .svg"):
        plot(runs, "val/student_top1", str(tmp_path / "top1.jpg"))


def test_smoothed_loss_and_best_follows_the_direction(tmp_path, capsys):
    losses = [3.0, 2.0, 2.5, 1.0, 1.5, 1.2]  # min 1.0 at step 20; max 3.0 at step 5
    run_dir = fake_run(str(tmp_path), "kd-loss", top1=(50.0, 70.0, 65.0), losses=losses)
    [run] = runs_from_dirs([run_dir])
    loss = summarise(run, "train/loss")
    assert loss["direction"] == "min" and loss["best"] == 1.0 and loss["best_step"] == 20
    assert loss["best_epoch"] == 2.0 and loss["final"] == 1.2
    top1 = summarise(run, "val/student_top1")
    assert top1["direction"] == "max" and top1["best"] == 70.0 and top1["best_epoch"] == 2.0 and top1["final"] == 65.0

    weight, expected, acc = 0.6, [], 0.0  # TensorBoard's debiased EMA, computed here apart
    for i, value in enumerate(losses, 1):
        acc = weight * acc + (1 - weight) * value
        expected.append(acc / (1 - weight ** i))
    assert np.allclose(ema(losses, weight), expected)
    fig = plot([run], "train/loss", str(tmp_path / "loss.png"), smooth=weight)
    [ax] = fig.axes
    assert ax.get_ylabel() == "training loss"
    raw, smooth = ax.get_lines()
    assert list(raw.get_ydata()) == losses and np.allclose(smooth.get_ydata(), expected)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kd-loss (kd), EMA 0.6"]
    assert list(raw.get_xdata()) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # windows at fractional epochs

    cli(["compare", run_dir, "--metric", "train/loss"])
    row = table_rows(capsys.readouterr().out, "run")["kd-loss"]
    assert row["best train/loss (min) @ epoch"] == "1.0000 @ 2" and row["last train/loss"] == "1.2000"


def test_group_by_method_mean_std_over_seeds_and_published(tmp_path, capsys):
    kd_last = {0: (50.0, 74.0, 73.1), 1: (52.0, 73.0, 72.6), 2: (51.0, 73.9, 73.9)}
    dirs = [fake_run(str(tmp_path), f"kd-s{s}", seed=s, top1=v, teacher_top1=79.0) for s, v in kd_last.items()]
    dirs += [fake_run(str(tmp_path), f"van-s{s}", method="vanilla", seed=s, student="resnet8x4", top1=v)
             for s, v in {0: (60.0, 72.0), 1: (61.0, 71.5)}.items()]
    cli(["compare", *dirs, "--group-by", "method"])
    out = capsys.readouterr().out
    rows = table_rows(out, "method")
    kd, vanilla = rows["kd"], rows["vanilla"]
    lasts = [v[-1] for v in kd_last.values()]
    bests = [max(v) for v in kd_last.values()]
    assert kd["seeds"] == "3" and kd["epoch"] == "3"
    assert kd["last top-1 (%) mean ± std"] == f"{np.mean(lasts):.2f} ± {np.std(lasts, ddof=1):.2f}"
    assert kd["best top-1 (%) mean ± std"] == f"{np.mean(bests):.2f} ± {np.std(bests, ddof=1):.2f}"
    assert kd["published"] == "73.33 [1]" and kd["last - published"] == f"{np.mean(lasts) - 73.33:+.2f}"
    assert vanilla["seeds"] == "2" and vanilla["published"] == "-"
    assert vanilla["last top-1 (%) mean ± std"] == f"{np.mean([72.0, 71.5]):.2f} ± {np.std([72.0, 71.5], ddof=1):.2f}"
    [source] = [line for line in out.splitlines() if line.startswith("[1] ")]
    assert "73.33" in source and "RepDistiller" in source and "CIFAR-100" in source

    # KD with logit standardization is a row of its own, with its own published figure.
    dirs += [fake_run(str(tmp_path), f"kdls-s{s}", seed=s, top1=(50.0, 76.0 + s), teacher_top1=79.0,
                      extra=["method.logit_standardization=true"]) for s in (0, 1)]
    png = tmp_path / "groups.png"
    cli(["compare", *dirs, "--group-by", "method,student,teacher", "--plot", str(png)])
    out = capsys.readouterr().out
    rows = table_rows(out, "method")
    assert rows["kd"]["student"] == "resnet8x4" and rows["kd"]["teacher"] == "resnet32x4"
    assert rows["vanilla"]["teacher"] == "-" and rows["kd"]["published"] == "73.33 [1]"
    assert rows["kd"]["seeds"] == "3" and rows["kd+ls"]["seeds"] == "2" and rows["kd+ls"]["published"] == "76.62 [2]"
    assert rows["kd+ls"]["last top-1 (%) mean ± std"] == f"76.50 ± {np.std([76.0, 77.0], ddof=1):.2f}"
    assert "[2] kd+ls resnet32x4 -> resnet8x4" in out and "logit-standardization-KD" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


# The figures as the READMEs print them (RepDistiller's same-type table, mdistiller's DKD table,
# DIST_KD's CIFAR-100 table), the ones the configs/<method>_cifar100.yaml comments cite.
PUBLISHED_CIFAR = [
    ("at", "wrn_40_2", "wrn_16_2", "74.08", "RepDistiller"),
    ("at", "resnet32x4", "resnet8x4", "73.44", "RepDistiller"),
    ("fitnet", "resnet32x4", "resnet8x4", "73.50", "RepDistiller"),
    ("fitnet", "wrn_40_2", "wrn_16_2", "73.58", "RepDistiller"),
    ("rkd", "resnet32x4", "resnet8x4", "71.90", "RepDistiller"),
    ("rkd", "wrn_40_2", "wrn_16_2", "73.35", "RepDistiller"),
    ("pkt", "resnet32x4", "resnet8x4", "73.64", "RepDistiller"),
    ("pkt", "wrn_40_2", "wrn_16_2", "74.54", "RepDistiller"),
    ("sp", "resnet32x4", "resnet8x4", "72.94", "RepDistiller"),
    ("sp", "wrn_40_2", "wrn_16_2", "73.83", "RepDistiller"),
    ("crd", "resnet32x4", "resnet8x4", "75.51", "RepDistiller"),
    ("crd", "wrn_40_2", "wrn_16_2", "75.48", "RepDistiller"),
    ("dkd", "wrn_40_2", "wrn_16_2", "76.23", "mdistiller"),
    ("dkd", "resnet56", "resnet20", "71.97", "mdistiller"),
    ("dkd", "resnet110", "resnet32", "74.11", "mdistiller"),
    ("dist", "resnet32x4", "resnet8x4", "76.31", "DIST_KD"),
    ("dist", "wrn_40_2", "wrn_40_1", "74.43", "DIST_KD"),
    ("dist", "resnet56", "resnet20", "71.75", "DIST_KD"),
]


def test_group_by_shows_the_feature_methods_and_other_pairs_published(tmp_path, capsys):
    dirs = [fake_run(str(tmp_path), f"{m}-{t}-{s}", method=m, teacher=t, student=s, top1=(50.0, 70.0))
            for m, t, s, _, _ in PUBLISHED_CIFAR]
    cli(["compare", *dirs, "--group-by", "method,teacher,student"])
    out = capsys.readouterr().out
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    header, rows = lines[0], {tuple(row[:3]): dict(zip(lines[0], row)) for row in lines[1:]}
    assert header[:3] == ["method", "teacher", "student"] and len(rows) == len(PUBLISHED_CIFAR)
    sources = {line.split("] ", 1)[0] + "]": line for line in out.splitlines() if line.startswith("[")}
    for method, teacher, student, top1, readme in PUBLISHED_CIFAR:
        row = rows[method, teacher, student]
        figure, index = row["published"].split()
        assert figure == top1 and row["last - published"] == f"{70.0 - float(top1):+.2f}", (method, teacher, student)
        source = sources[index]
        assert f"{method} {teacher} -> {student}, cifar100: top-1 {top1}%" in source and readme in source, source
        assert "github.com/" in source  # read back from the README, not only as the design notes give it
    assert "± 0.19" in sources[rows["dist", "resnet32x4", "resnet8x4"]["published"].split()[1]]


def test_group_by_curves_and_odd_groups(tmp_path, capsys):
    from kdscale.analysis.plots import group_series
    from kdscale.analysis.seeds import group_runs

    a = fake_run(str(tmp_path), "a", seed=0, top1=(10.0, 20.0, 30.0), teacher_top1=70.0)
    b = fake_run(str(tmp_path), "b", seed=0, top1=(14.0, 22.0), teacher_top1=70.0)  # same seed, 2 epochs
    runs = runs_from_dirs([a, b])
    groups = group_runs(runs, [summarise(r, "val/student_top1") for r in runs], ["method"])
    [series] = group_series(groups, ["method"], "val/student_top1", "epochs")
    assert series["x"] == [1.0, 2.0] and series["y"] == [12.0, 21.0]
    assert np.allclose(series["std"], [statistics.stdev([10, 14]), statistics.stdev([20, 22])])
    cli(["compare", a, b, "--group-by", "method"])
    out = capsys.readouterr().out
    assert "note: method=kd: runs end at different epochs (2, 3)" in out and "note: method=kd: a seed repeats" in out


def test_summary_and_compare_print_the_same_images_per_s(tmp_path, capsys):
    speeds = [400.0, 1000.0, 990.0, 1010.0, 500.0, 1005.0]  # a start-up window, one with validation
    run_dir = fake_run(str(tmp_path), "fast", speeds=speeds)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:  # a resumed session logs step 30 again
        fh.write(json.dumps({"step": 30, "train/loss": 0.5, "perf/images_per_s": 1003.0}) + "\n")
    expected = statistics.median([1000.0, 990.0, 1010.0, 500.0, 1003.0])  # first window out, step 30 resumed
    assert images_per_s(runs_from_dirs([run_dir])[0]["history"]) == expected
    cli(["summary", run_dir])
    summary = table_rows(capsys.readouterr().out, "run")["fast"]
    cli(["compare", run_dir])
    compare = table_rows(capsys.readouterr().out, "run")["fast"]
    assert summary["images/s"] == compare["images/s"] == f"{expected:.0f}"
    assert json.load(open(os.path.join(run_dir, "summary.json")))["images_per_s"] != expected  # the last window
    assert summary["network"] == compare["network"] == "resnet8x4 <- resnet32x4"


def test_summary_labels_a_vanilla_run_by_its_role(tmp_path, capsys):
    run_dir = fake_run(str(tmp_path), "teacher-r32x4", method="vanilla", student="resnet32x4")
    cli(["summary", run_dir])
    out = capsys.readouterr().out
    row = table_rows(out, "run")["teacher-r32x4"]
    assert row["network"] == "resnet32x4 (alone)" and row["top-1 (%)"] == "60.00" and row["teacher top-1 (%)"] == "-"
    assert "student" not in out.splitlines()[0]


def test_wandb_offline_run_has_top_level_keys(tmp_path, monkeypatch):
    import wandb

    from kdscale.analysis.wandb_files import read_runs
    from kdscale.runtime.tracking import Tracker

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_config(str(tmp_path / "data"), str(tmp_path), "wandb.mode=offline", "method.name=kd",
                      "student.name=resnet8", "teacher.name=resnet20", "experiment.seed=7",
                      "experiment.dataset=cifar10", "data.batch_size=16", name="keys")
    tracker = Tracker(cfg, config_to_dict(cfg), None, is_main=True)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    wandb.teardown()  # the service writes the run file before its reader starts
    [run] = read_runs(str(tmp_path / "keys"))
    keys = {"method": "kd", "seed": 7, "student": "resnet8", "teacher": "resnet20", "dataset": "cifar10"}
    assert {k: run["config"][k] for k in keys} == keys and {k: run["summary"][k] for k in keys} == keys
    assert run["config"]["method_config"]["temperature"] == 4.0 and run["config"]["global_batch"] == 16
    assert run["config"]["optim"]["lr"] == 0.05
    written = json.load(open(tmp_path / "keys" / "run.json"))
    assert written["wandb_run_id"] == run["id"] and {k: written[k] for k in keys} == keys


@pytest.mark.slow
def test_real_tiny_runs_over_two_seeds(synth_data, tmp_path, capsys):
    from kdscale.train.loop import Trainer

    dirs = []
    for seed in (0, 1):
        cfg = make_config(synth_data, str(tmp_path), "student.name=resnet8", "data.train_samples=256",
                          "train.epochs=2", f"experiment.seed={seed}", name=f"vanilla-s{seed}")
        Trainer(cfg).train()
        dirs.append(cfg.run_dir)
    runs = runs_from_dirs(dirs)
    lasts = [summarise(r, "val/student_top1")["final"] for r in runs]
    assert all(r["config"]["seed"] == s for r, s in zip(runs, (0, 1)))
    png = tmp_path / "seeds.pdf"
    cli(["compare", *dirs, "--group-by", "method", "--plot", str(png)])
    out = capsys.readouterr().out
    row = table_rows(out, "method")["vanilla"]
    assert row["seeds"] == "2" and row["epoch"] == "2"
    assert row["last top-1 (%) mean ± std"] == f"{np.mean(lasts):.2f} ± {np.std(lasts, ddof=1):.2f}"
    assert png.read_bytes()[:5] == b"%PDF-"
    cli(["summary", *dirs])
    summary = table_rows(capsys.readouterr().out, "run")
    cli(["compare", *dirs])
    compare = table_rows(capsys.readouterr().out, "run")
    for name in ("vanilla-s0", "vanilla-s1"):
        assert summary[name]["images/s"] == compare[name]["images/s"] != "-"
        assert not math.isnan(float(compare[name]["images/s"]))


def test_plot_draws_every_teacher_and_the_ensemble_of_a_run_with_several(tmp_path):
    two = "teachers=[{id: r32, name: resnet32x4}, {id: wrn, name: wrn_40_2}]"
    run = fake_run(str(tmp_path), "kd-ensemble", teacher=None, extra=(two,))
    with open(os.path.join(run, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": 30, "val/r32_top1": 75.0, "val/wrn_top1": 73.0, "val/ensemble_top1": 77.0,
                             "epoch": 3}) + "\n")
    fig = plot(runs_from_dirs([run]), "val/student_top1", str(tmp_path / "top1.png"))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["kd-ensemble (kd)", "teacher resnet32x4: 75.00%", "teacher wrn_40_2: 73.00%",
                      "ensemble of resnet32x4 + wrn_40_2: 77.00%"]
