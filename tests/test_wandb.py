"""wandb: real offline runs read back from their files; resumed runs continue the same run;
an unreachable server falls back to offline; `kdscale compare` tables and plots runs."""

from __future__ import annotations

import os

from PIL import Image

from conftest import PYTHON, base_overrides, make_config, run_cli
from kdscale.analysis.wandb_files import read_runs
from kdscale.cli import main as cli
from kdscale.train.loop import Trainer


def offline_overrides(synth_data, tmp_path, name, *extra):
    overrides = [o for o in base_overrides(synth_data, str(tmp_path), name=name) if not o.startswith("wandb.")]
    return overrides + ["student.name=resnet8", "data.train_samples=256", "train.epochs=2", *extra]


def test_offline_run_resumes_as_the_same_wandb_run(synth_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: auto mode must pick offline
    first = run_cli([PYTHON, "-m", "kdscale.train", *offline_overrides(synth_data, tmp_path, "r",
                                                                      "train.stop_after_steps=5")])
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([PYTHON, "-m", "kdscale.train", *offline_overrides(synth_data, tmp_path, "r")])
    assert second.returncode == 0, second.stderr[-2000:]
    runs = read_runs(str(tmp_path / "r"))
    assert len(runs) == 1 and len(runs[0]["files"]) == 2
    run = runs[0]
    assert run["group"] == "r" and run["job_type"] == "train"
    assert set(run["tags"]) >= {"method:vanilla", "dataset:synthetic", "student:resnet8"}
    assert run["config"]["optim"]["lr"] == 0.05 and run["config"]["student"]["name"] == "resnet8"
    steps = sorted({row["_step"] for row in run["history"] if "train/loss" in row})
    assert steps == [5, 10, 15, 16]  # logged every 5 steps and at each stop: 5 before the restart
    assert any("val/student_top1" in row for row in run["history"])


def test_unreachable_wandb_server_falls_back_to_offline(synth_data, tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "HOME": str(tmp_path)}
    result = run_cli([PYTHON, "-m", "kdscale.train", *offline_overrides(synth_data, tmp_path, "fallback",
                                                                       "wandb.init_timeout_s=5",
                                                                       "train.epochs=1")], env_extra=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb could not start online" in result.stderr and "logging offline instead" in result.stderr
    runs = read_runs(str(tmp_path / "fallback"))
    assert len(runs) == 1 and any("train/loss" in row for row in runs[0]["history"])


def test_compare_runs_table_and_plot(synth_data, tmp_path, capsys):
    for name, lr in (("low-lr", "0.01"), ("high-lr", "0.1")):
        cfg = make_config(synth_data, str(tmp_path), "student.name=resnet8", "data.train_samples=256",
                          "train.epochs=2", "wandb.mode=offline", f"optim.lr={lr}", name=name)
        Trainer(cfg).train()
    png = tmp_path / "compare.png"
    cli(["compare", str(tmp_path / "low-lr"), str(tmp_path / "high-lr"), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "| low-lr " in out and "| high-lr " in out and "final val/student_top1" in out
    image = Image.open(png).convert("RGB")
    assert image.size == (900, 560)
    colors = set(image.getdata())
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # one line per run
    assert os.path.getsize(png) > 1000
