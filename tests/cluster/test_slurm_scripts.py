"""The Slurm scripts without Slurm (fast): every shipped ``configs/*_imagenet.yaml`` has a
``slurm/<name>.sh`` wrapper over the generic ``slurm/train.sh``, every script parses, the
generic script refuses a missing or nonexistent config (and a malformed override) in one
line before anything starts, and a wrapper hands its config and overrides on to
``slurm/launch.sh`` (run here against stand-in ``scontrol``/``srun`` commands)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
from helpers.common import ROOT

SLURM = os.path.join(ROOT, "slurm")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*_imagenet.yaml")))
WRAPPERS = sorted(glob.glob(os.path.join(SLURM, "*_imagenet.sh")))
# kdscale.teach (teacher-output shards), not training: it calls launch.sh in teach mode itself.
NOT_THROUGH_TRAIN = {"teach_imagenet.sh"}
TRAIN_WRAPPERS = [path for path in WRAPPERS if os.path.basename(path) not in NOT_THROUGH_TRAIN]
HEADER = ["--nodes=2", "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@300", "--output=slurm-%x-%j.out"]
EXEC = re.compile(r'^exec bash "\$\{KDSCALE_REPO:-\$\{SLURM_SUBMIT_DIR:-\$PWD\}\}/slurm/train\.sh" '
                  r'"\$\{KDSCALE_CONFIG:-(?P<config>[^}"]+)\}" "\$@"$')


def _name(path: str) -> str:
    return os.path.basename(path).rsplit(".", 1)[0]


def _code_lines(path: str) -> list[str]:
    """The lines bash runs: no blank lines, no comments (``#SBATCH`` included)."""
    with open(path) as fh:
        lines = [line.strip() for line in fh]
    return [line for line in lines if line and not line.startswith("#")]


def _sbatch_options(path: str) -> list[str]:
    with open(path) as fh:
        return [line.split(None, 1)[1].strip() for line in fh if line.startswith("#SBATCH ")]


@pytest.fixture
def stubs(tmp_path):
    """Stand-ins for Slurm's commands on PATH, each recording its call; ``srun`` also records
    the config, overrides and output directory that launch.sh hands to every node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    bodies = {
        "scontrol": 'case "$2" in hostnames) echo node1 ;; node) echo "NodeName=node1 NodeAddr=127.0.0.1" ;; esac',
        "srun": 'printf "%s\\n" "config=$KDSCALE_CONFIG" "overrides=$KDSCALE_OVERRIDES" "output=${KDSCALE_OUTPUT:-}" '
                '"args=$*" > "$KDSCALE_TEST_SRUN"',
        "sbatch": "exit 1",
    }
    for name, body in bodies.items():
        script = bin_dir / name
        script.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{calls}"\n{body}\n')
        script.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_", "KDSCALE_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", KDSCALE_REPO=ROOT, KDSCALE_PYTHON=sys.executable,
               KDSCALE_PREEMPT_FILE=str(tmp_path / "preempt"), KDSCALE_TEST_SRUN=str(tmp_path / "srun.txt"),
               SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="123")
    return env, calls, tmp_path / "srun.txt"


def _run(script: str, *args: str, env: dict, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(SLURM, script), *args], env=env, cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=30)


def test_every_imagenet_config_has_a_wrapper():
    assert len(CONFIGS) >= 16, CONFIGS  # at, crd, ctkd, dist, dkd, dml, ffcl, fitnet, kd, kd_ls, pkt, prokt, ...
    missing = [_name(config) for config in CONFIGS if not os.path.isfile(os.path.join(SLURM, _name(config) + ".sh"))]
    assert not missing, f"no slurm/<name>.sh for configs/<name>.yaml: {missing}"
    assert {_name(path) for path in TRAIN_WRAPPERS} == {_name(config) for config in CONFIGS}


@pytest.mark.parametrize("wrapper", TRAIN_WRAPPERS, ids=_name)
def test_wrapper_names_its_config_and_goes_through_the_generic_script(wrapper):
    code = _code_lines(wrapper)
    assert len(code) == 1, f"{wrapper}: a thin wrapper is its exec line alone, got {code}"
    match = EXEC.match(code[0])
    assert match, f"{wrapper}: does not exec slurm/train.sh with its config and \"$@\": {code[0]}"
    config = match["config"]
    assert config == f"configs/{_name(wrapper)}.yaml"
    assert os.path.isfile(os.path.join(ROOT, config)), f"{wrapper} names {config}, which does not exist"
    assert os.access(wrapper, os.X_OK)
    options = _sbatch_options(wrapper)
    assert f"--job-name=kdscale-{_name(wrapper).replace('_', '-')}" in options
    assert [option for option in options if not option.startswith("--job-name=")] == HEADER


def test_teach_wrapper_names_an_existing_config():
    (line,) = [line for line in _code_lines(os.path.join(SLURM, "teach_imagenet.sh")) if "KDSCALE_CONFIG:-" in line]
    config = re.search(r"KDSCALE_CONFIG:-([^}]+)\}", line)[1]
    assert os.path.isfile(os.path.join(ROOT, config)), config


def test_generic_script_has_the_same_sbatch_defaults():
    options = _sbatch_options(os.path.join(SLURM, "train.sh"))
    assert options == ["--job-name=kdscale-train", *HEADER]
    assert os.access(os.path.join(SLURM, "train.sh"), os.X_OK)


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(SLURM, "*.sh"))), ids=os.path.basename)
def test_bash_parses_every_slurm_script(script):
    result = subprocess.run(["bash", "-n", script], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script, args, env_extra, expected", [
    ("train.sh", [], {}, ("kdscale slurm: error: no config given; the first argument is the experiment YAML: "
                          "sbatch [sbatch flags] slurm/train.sh configs/<name>.yaml")),
    ("train.sh", [""], {}, "kdscale slurm: error: no config given"),
    ("train.sh", ["configs/does_not_exist.yaml"], {},
     "kdscale slurm: error: config file not found: configs/does_not_exist.yaml (relative to " + ROOT + " on "),
    ("train.sh", ["configs/kd_imagenet.yaml", "optim.lr"], {},
     "kdscale slurm: error: override 'optim.lr' must be one word of the form key.sub=value"),
    ("train.sh", ["configs/kd_imagenet.yaml", "optim.lr=0.2 train.epochs=1"], {},
     "kdscale slurm: error: override 'optim.lr=0.2 train.epochs=1' must be one word"),
    ("train.sh", ["configs/kd_imagenet.yaml"], {"KDSCALE_REPO": "/nonexistent-kdscale-repo"},
     "kdscale slurm: error: no kdscale repository at /nonexistent-kdscale-repo"),
    # What tests/cluster/test_slurm.py::test_missing_config_fails_clearly reads from a real job's log.
    ("ctkd_imagenet.sh", [], {"KDSCALE_CONFIG": "configs/does_not_exist.yaml"},
     "kdscale slurm: error: config file not found: configs/does_not_exist.yaml"),
], ids=["no-argument", "empty-argument", "nonexistent-config", "override-without-value", "override-with-space",
        "no-repository", "wrapper-nonexistent-config"])
def test_generic_script_refuses_in_one_line_before_anything_starts(stubs, tmp_path, script, args, env_extra,
                                                                    expected):
    env, calls, _ = stubs
    # From another directory: the config is looked up in the repository, not where bash runs.
    result = _run(script, *args, env={**env, **env_extra}, cwd=str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]
    if "config file not found" in expected:  # slurm/train.sh's own line (launch.sh's names no such fix)
        assert "give an existing experiment YAML (ls configs/*_imagenet.yaml)" in lines[0], lines[0]
    assert not calls.exists(), f"Slurm was called before the refusal: {calls.read_text()}"


@pytest.mark.parametrize("wrapper", TRAIN_WRAPPERS, ids=_name)
def test_wrapper_hands_config_and_overrides_to_launch(stubs, wrapper):
    env, calls, srun = stubs
    env = {**env, "KDSCALE_OVERRIDES": "train.epochs=1", "KDSCALE_OUTPUT": "/scratch/runs"}
    result = _run(os.path.basename(wrapper), "optim.lr=0.2", "data.batch_size=64", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"config configs/{_name(wrapper)}.yaml" in result.stdout  # launch.sh's start line
    handed = dict(line.split("=", 1) for line in srun.read_text().splitlines())
    assert handed["config"] == f"configs/{_name(wrapper)}.yaml"
    # The environment's overrides first, the command line's after them (the later one wins).
    assert handed["overrides"] == "train.epochs=1 optim.lr=0.2 data.batch_size=64"
    assert handed["output"] == "/scratch/runs"
    assert handed["args"].split()[-2:] == [os.path.join(ROOT, "slurm", "node.sh"), "train"]
    assert "srun " in calls.read_text()


def test_generic_script_without_overrides_keeps_the_environment_ones(stubs):
    env, _, srun = stubs
    result = _run("train.sh", "configs/dkd_imagenet.yaml", env={**env, "KDSCALE_OVERRIDES": "optim.lr=0.2"})
    assert result.returncode == 0, result.stdout + result.stderr
    handed = dict(line.split("=", 1) for line in srun.read_text().splitlines())
    assert handed["config"] == "configs/dkd_imagenet.yaml" and handed["overrides"] == "optim.lr=0.2"


def test_teach_wrapper_runs_kdscale_teach(stubs):
    env, _, srun = stubs
    result = _run("teach_imagenet.sh", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    handed = dict(line.split("=", 1) for line in srun.read_text().splitlines())
    assert handed["config"] == "configs/kd_imagenet.yaml"
    assert handed["args"].split()[-1] == "teach"
