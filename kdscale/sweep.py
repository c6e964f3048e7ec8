"""``kdscale sweep``: a grid of runs (methods x seeds x overrides), each a normal resumable
run, one after another on this machine or as a Slurm job array (``slurm/sweep.sh``).

Every run gets ``method.name``, ``experiment.seed`` and an ``experiment.name`` of
``<base>-<method>-s<seed>[-<key>=<value>...]`` in the config's output directory, so
``kdscale compare --group-by method <output_dir>/<base>-*`` averages over the seeds. The
grid is written first (``<output_dir>/<base>.sweep.tsv``: config, overrides, run directory
per line): it is what the array tasks read, and what a rerun resumes. Locally, a finished
run (``summary.json`` with ``completed: true``) is skipped and an unfinished one resumes; a
failed run does not stop the others, and the sweep exits non-zero naming each failure.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

from kdscale.errors import KdscaleError
from kdscale.log import log


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> (key, [v1, v2])."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise KdscaleError(f"--grid {text!r}: expected key=value1,value2 (e.g. method.temperature=2,4)")
    return key, values.split(",")


def expand(config: str, methods: list[str], seeds: list[int], axes: list[str], overrides: list[str]) -> list[dict]:
    """One entry per run: its name, overrides and run directory."""
    from kdscale.config import load_config
    from kdscale.methods import get_method_class

    base_cfg = load_config(config, overrides)  # a bad config or override fails here, before anything runs
    for method in methods:
        get_method_class(method, where="--methods")
    grid = [parse_axis(axis) for axis in axes]
    base = base_cfg.experiment.name
    runs = []
    for method, seed, *values in itertools.product(methods, seeds, *[v for _, v in grid]):
        chosen = [f"{key}={value}" for (key, _), value in zip(grid, values)]
        name = "-".join([base, method, f"s{seed}", *chosen]).replace("/", "_")
        run_overrides = [*overrides, f"method.name={method}", f"experiment.seed={seed}", *chosen,
                         f"experiment.name={name}"]
        load_config(config, run_overrides)  # every combination is valid before the first run starts
        runs.append({"name": name, "overrides": run_overrides,
                     "run_dir": os.path.join(base_cfg.experiment.output_dir, name)})
    return runs


def write_grid(config: str, runs: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as fh:
        for run in runs:
            fh.write(f"{config}\t{' '.join(run['overrides'])}\t{run['run_dir']}\n")
    os.replace(f"{path}.tmp", path)
    return path


def completed(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return bool(json.load(fh).get("completed"))
    except (OSError, ValueError):
        return False


def run_locally(config: str, runs: list[dict]) -> list[str]:
    """Each run in turn as its own process; the names of those that failed."""
    failed = []
    for index, run in enumerate(runs, start=1):
        if completed(run["run_dir"]):
            log.info(f"sweep {index}/{len(runs)}: {run['name']} already completed")
            continue
        log.info(f"sweep {index}/{len(runs)}: {run['name']}")
        result = subprocess.run([sys.executable, "-m", "kdscale.train", "--config", config, *run["overrides"]])
        if result.returncode != 0:
            log.warning(f"sweep {index}/{len(runs)}: {run['name']} exited with {result.returncode}; going on")
            failed.append(run["name"])
    return failed


def submit_array(grid_path: str, count: int, script: str, sbatch_args: list[str]) -> str:
    command = ["sbatch", "--parsable", f"--array=0-{count - 1}", *sbatch_args, script, os.path.abspath(grid_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KdscaleError(f"sbatch refused the sweep ({' '.join(command)}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def run_sweep(args) -> dict:
    if not os.path.isfile(args.config):
        raise KdscaleError(f"--config {args.config}: no such file")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise KdscaleError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
    from kdscale.config import load_config

    base_cfg = load_config(args.config, args.overrides)
    methods = [m for m in (args.methods or base_cfg.method.name).split(",") if m]
    runs = expand(args.config, methods, seeds, args.grid or [], args.overrides)
    base = base_cfg.experiment
    grid_path = write_grid(args.config, runs, os.path.join(base.output_dir, f"{base.name}.sweep.tsv"))
    print(f"kdscale sweep: {len(runs)} runs ({len(methods)} methods x {len(seeds)} seeds"
          f"{' x ' + ' x '.join(a.split('=')[0] for a in args.grid) if args.grid else ''}), grid {grid_path}")
    if args.dry_run:
        for run in runs:
            print(f"  {run['name']}: {' '.join(run['overrides'])}")
        return {"grid": grid_path, "runs": runs}
    if args.slurm:
        job = submit_array(grid_path, len(runs), args.slurm_script, args.sbatch or [])
        print(f"kdscale sweep: submitted Slurm array job {job} ({len(runs)} tasks)")
        return {"grid": grid_path, "runs": runs, "job": job}
    failed = run_locally(args.config, runs)
    if failed:
        raise KdscaleError(f"{len(failed)} of {len(runs)} sweep runs failed: {', '.join(failed)}; rerun the same "
                           f"command to resume them (completed runs are skipped)")
    return {"grid": grid_path, "runs": runs}


def add_parser(commands) -> None:
    sweep = commands.add_parser("sweep", help="run a grid of methods x seeds x overrides (locally or on Slurm)")
    sweep.add_argument("--config", required=True, help="experiment YAML shared by every run")
    sweep.add_argument("--methods", help="comma list, e.g. kd,at,dml (default: the config's method; another "
                                         "method needs a config without the first one's method keys)")
    sweep.add_argument("--seeds", default="0,1,2", help="comma list of experiment.seed values (default 0,1,2)")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="another axis (repeatable)")
    sweep.add_argument("--slurm", action="store_true", help="submit a Slurm job array instead of running here")
    sweep.add_argument("--slurm-script", default=os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                              "slurm", "sweep.sh"))
    sweep.add_argument("--sbatch", action="append", metavar="ARG", help="extra sbatch argument (repeatable)")
    sweep.add_argument("--dry-run", action="store_true", help="print the grid and write it, run nothing")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    sweep.set_defaults(func=run_sweep)
