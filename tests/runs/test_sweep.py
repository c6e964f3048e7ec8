"""``kdscale sweep``: the grid it expands, its clear errors, and a real local sweep whose
runs complete, differ by seed, and are skipped when the sweep is run again. (The Slurm
array form runs on the test cluster in tests/cluster/test_slurm.py.)"""

from __future__ import annotations

import json
import statistics

import pytest
from helpers.common import run_cli
from helpers.sweeps import PYTHON, write_config


def test_dry_run_expands_the_grid(synth_data, tmp_path):
    config = write_config(tmp_path, synth_data)
    result = run_cli([PYTHON, "-m", "kdscale.cli", "sweep", "--config", config, "--methods", "vanilla,dml",
                      "--seeds", "0,1", "--grid", "optim.lr=0.05,0.1", "--dry-run", "train.epochs=2"])
    assert result.returncode == 0, result.stderr
    lines = open(tmp_path / "runs" / "grid.sweep.tsv").read().splitlines()
    assert len(lines) == 2 * 2 * 2
    names = [line.split("\t")[2].rsplit("/", 1)[1] for line in lines]
    assert names[0] == "grid-vanilla-s0-optim.lr=0.05" and "grid-dml-s1-optim.lr=0.1" in names
    first = lines[0].split("\t")[1].split()
    assert first[-4:] == ["method.name=vanilla", "experiment.seed=0", "optim.lr=0.05",
                          "experiment.name=grid-vanilla-s0-optim.lr=0.05"]
    assert "train.epochs=2" in first


@pytest.mark.parametrize("args, message", [
    (["--methods", "kd_typo"], "--methods: unknown method 'kd_typo'"),
    (["--methods", "vanilla", "--seeds", "a,b"], "--seeds 'a,b': expected integers"),
    (["--methods", "vanilla", "--grid", "optim.lr"], "--grid 'optim.lr': expected key=value1,value2"),
    (["--methods", "vanilla", "--grid", "optim.nope=1,2"], "optim.nope"),
])
def test_bad_input_is_one_clear_line(synth_data, tmp_path, args, message):
    config = write_config(tmp_path, synth_data)
    result = run_cli([PYTHON, "-m", "kdscale.cli", "sweep", "--config", config, *args, "--dry-run"])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # two real training runs
def test_local_sweep_runs_each_seed_and_resumes(synth_data, tmp_path):
    config = write_config(tmp_path, synth_data)
    command = [PYTHON, "-m", "kdscale.cli", "sweep", "--config", config, "--methods", "vanilla,dml",
               "--seeds", "3,4"]
    result = run_cli(command)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = {(m, s): tmp_path / "runs" / f"grid-{m}-s{s}" for m in ("vanilla", "dml") for s in (3, 4)}
    summaries = {key: json.load(open(path / "summary.json")) for key, path in runs.items()}
    assert all(s["completed"] for s in summaries.values())
    assert summaries["vanilla", 3]["metrics"] != summaries["vanilla", 4]["metrics"]  # the seeds differ
    again = run_cli(command)
    assert again.returncode == 0 and again.stdout.count("already completed") == 4, again.stdout
    # The grouped table: mean and std over the seeds, as computed here by hand.
    table = run_cli([PYTHON, "-m", "kdscale.cli", "compare", "--group-by", "method", *map(str, runs.values())])
    assert table.returncode == 0, table.stderr
    for method in ("vanilla", "dml"):
        top1 = [summaries[method, s]["metrics"]["val/student_top1"] for s in (3, 4)]
        mean, std = statistics.mean(top1), statistics.stdev(top1)
        line = next(line for line in table.stdout.splitlines() if line.lstrip("| ").startswith(method))
        assert f"{mean:.2f} ± {std:.2f}" in line, (line, mean, std)
