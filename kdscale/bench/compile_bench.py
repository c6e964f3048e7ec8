"""``train.compile`` measured: the online-KD training step (the student and the frozen
teacher each compiled in place, as the trainer does) against the same step eager, side
by side in every round. Compilation happens in the warm-up steps and is not timed; its
cost is reported separately (seconds to the first compiled step)."""

from __future__ import annotations

import copy
import time

import torch

from kdscale.bench.timing import (
    interleaved_rounds,
    ratio_over_rounds,
    throughput_summary,
)
from kdscale.engines import DDPEngine
from kdscale.methods import MethodContext, get_method_class
from kdscale.runtime.compile import compile_in_place, networks_of


def online_kd_step(setup, compiled: bool):
    cls = get_method_class("kd")
    distiller = cls(copy.deepcopy(setup.student), cls.Params(), MethodContext(setup.num_classes, setup.image_size))
    distiller.train()
    frozen = setup.frozen_teacher()
    if compiled:
        compile_in_place(networks_of(distiller))
        frozen.model.compile()
    engine = DDPEngine(distiller, setup.cfg, setup.ctx)

    def step():
        engine.micro_step("all", setup.images, setup.targets, frozen(setup.images), True, 0.01, setup.autocast)
    return step


def bench_compile(setup, steps: int, rounds: int) -> dict:
    eager, compiled = online_kd_step(setup, False), online_kd_step(setup, True)
    start = time.perf_counter()
    compiled()  # compiles the student (forward and backward) and the teacher
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)  # the first step's kernels are queued, not done, until then
    compile_s = time.perf_counter() - start
    samples = interleaved_rounds({"online_kd_eager": (eager, setup.batch), "online_kd_compiled": (compiled, setup.batch)},
                                 setup.device, steps=steps, rounds=rounds, warmup=2)
    torch._dynamo.reset()
    return {"throughput": throughput_summary(samples), "first_compiled_step_s": compile_s,
            "ratios": {"compiled_vs_eager_online_kd": ratio_over_rounds(samples["online_kd_compiled"],
                                                                        samples["online_kd_eager"])}}
