"""``python -m kdscale.probes OUT MODE ... [+ MODE ...]`` under a launcher: run each probe in
turn in the same processes and write every rank's result to OUT (one list per mode when
several are joined by ``+``: the scale-out tests pay the process start-up, most of a
probe's time, once per rank count, not once per case).

Modes: ``train <strategy> <method> [key=value ...]`` (:mod:`.engine_train`), ``teacher``
(:mod:`.teacher_build`), ``crd_bank <samples> <dim> <batch per rank> <negatives> <steps>``
(:mod:`.crd_bank`)."""

from __future__ import annotations

import json
import sys

import torch
import yaml

from kdscale.parallel.context import DistContext
from kdscale.probes.crd_bank import run_crd_bank
from kdscale.probes.engine_train import run_train
from kdscale.probes.teacher_build import run_teacher


def run_spec(ctx: DistContext, mode: str, *rest: str) -> list[dict]:
    """One mode's result of every rank, in rank order."""
    if mode == "crd_bank":
        result = run_crd_bank(ctx, *(int(value) for value in rest))
    elif mode == "teacher":
        result = run_teacher(ctx)
    else:
        params = {key: yaml.safe_load(value) for key, value in (arg.split("=", 1) for arg in rest[2:])}
        result = run_train(rest[0], rest[1], ctx, params)
    gathered = [None] * ctx.world_size
    if ctx.distributed:
        torch.distributed.all_gather_object(gathered, result)
    else:
        gathered = [result]
    return gathered


def split_specs(args: list[str]) -> list[list[str]]:
    """``train ddp kd + train zero2 kd + teacher`` -> one list per mode."""
    specs: list[list[str]] = [[]]
    for arg in args:
        if arg == "+":
            specs.append([])
        else:
            specs[-1].append(arg)
    return specs


def main() -> None:
    """``OUT MODE ...``: OUT holds the per-rank results. Several modes joined by ``+`` run one after
    the other in the same processes (one launch); OUT then holds one such list per mode."""
    out_path, *args = sys.argv[1:]
    ctx = DistContext.from_env()
    specs = split_specs(args)
    results = [run_spec(ctx, *spec) for spec in specs]
    if ctx.is_main:
        with open(out_path, "w") as fh:
            json.dump(results[0] if len(specs) == 1 else results, fh)
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    from kdscale.lifecycle.exit import run_then_exit

    run_then_exit(main)
