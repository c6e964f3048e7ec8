"""Drive kdscale's engines on fixed global batches on 1 or 2 ranks and write what happened
to a JSON file: ``python -m kdscale.bench.engine_probe OUT MODE ...`` under a launcher.
Used by ``kdscale bench`` (memory) and by the scale-out tests.

Modes:
- ``train <strategy> <method> [key=value ...]``: N steps of a BN-free student (and teacher) so a 2-rank
  run is mathematically the 1-rank run with the global batch split in two; records the
  global mean loss per step, optimizer-state bytes, the parameters this rank's optimizer
  holds, and locally held trainable parameters. ``key=value`` pairs (YAML values) set method
  parameters, the rest keep their defaults.
- ``teacher``: a frozen teacher partitioned by ZeRO-3, handed over whole and built partitioned;
  records its output difference to the unsharded teacher, the locally held parameters and
  the peak parameters held while building.
- ``crd_bank <samples> <dim> <batch per rank> <negatives> <steps>``: CRD's memory banks for a
  training set of that size, sharded over the ranks: the bytes of this rank's rows, the
  resident memory they added, and the seconds per step of the contrast loss's forward and
  backward (median over the steps after the first) on random embeddings.

Modes joined by ``+`` (``OUT train ddp kd + train zero2 kd``) run one after the other in one
launch, each from its own seed and networks: the scale-out tests pay the process start-up
(most of a probe's time) once per rank count, not once per case.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys

import torch
import yaml
from torch import nn

from kdscale.config import load_config
from kdscale.engines import make_engine
from kdscale.methods import MethodContext, get_method_class
from kdscale.parallel.context import DistContext
from kdscale.teachers.frozen import FrozenTeacher

GLOBAL_BATCH, STEPS, CLASSES, SAMPLES = 8, 5, 10, 64


class PlainNet(nn.Module):
    """Stem + two conv stages + linear, without BatchNorm: per-rank batches then change
    nothing but the split. The stem is the same for every width (CTKD shares it)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(16, width, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.relu(self.conv1(x)))).mean(dim=(2, 3)))


def global_batches():
    """(images, targets, dataset indices) of each step; the indices are distinct within a step."""
    gen, index_gen = torch.Generator().manual_seed(123), torch.Generator().manual_seed(321)
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
        yield (images, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen),
               torch.randperm(SAMPLES, generator=index_gen)[:GLOBAL_BATCH])


def run_train(strategy: str, method_name: str, ctx: DistContext, params: dict | None = None) -> dict:
    per_rank = GLOBAL_BATCH // ctx.world_size
    cfg = load_config(None, [f"distributed.strategy={strategy}", f"data.batch_size={per_rank}",
                             "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.01"])
    torch.manual_seed(0)
    teacher_width = 16 if (params or {}).get("share_trunk") else 24  # a shared trunk needs the same widths
    student, teacher = PlainNet(16), PlainNet(teacher_width)
    cls = get_method_class(method_name)
    mctx = MethodContext(num_classes=CLASSES, image_size=16, method_name=method_name, teacher_network=teacher,
                         teacher_role=cls.teacher_role, teacher_name="plain24",
                         teacher_pretrained=True, build_model=lambda _name: PlainNet(24),
                         train_labels=torch.arange(SAMPLES) % CLASSES)
    distiller = cls(student, cls.Params(**(params or {})), mctx).train().to(ctx.device)
    frozen = FrozenTeacher(teacher, list(distiller.teacher_needs().features), ctx.device, None, False) \
        if cls.teacher_role == "frozen" else None
    engine = make_engine(strategy, distiller, cfg, ctx)
    losses = []
    for images, targets, indices in global_batches():
        mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        images, targets, indices = (t[mine].to(ctx.device) for t in (images, targets, indices))
        teacher_output = frozen(images) if frozen else None
        step_total = 0.0
        for phase in distiller.phases():
            terms, _ = engine.micro_step(phase, images, targets, teacher_output, True, 0.01, contextlib.nullcontext,
                                         sample_indices=indices)
            step_total += sum(t.detach() for t in terms.values())
        losses.append(ctx.all_reduce(torch.as_tensor(step_total).reshape(1).float(), "mean").item())
    state = distiller.gathered_state()  # per-sample state (CRD's banks), gathered whole
    banks = {k: v.double().sum().item() for k, v in (state or {}).items() if torch.is_tensor(v)}
    values = {k: v.flatten().tolist() for k, v in (state or {}).items() if torch.is_tensor(v) and v.numel() <= 4096}
    trainable = sum(p.numel() for p in distiller.parameters())
    per_network = sum(p.numel() for net in distiller.children() for p in net.parameters())
    return {"losses": losses, "optimizer_state_bytes": engine.optimizer_state_bytes(),
            "optimizer_parameters": engine.optimizer_parameter_count(), "per_network_parameters": per_network,
            "local_parameters": engine.local_parameter_count(), "trainable_parameters": trainable,
            "parameter_bytes": engine.local_parameter_count() * 4, "gradient_bytes": engine.gradient_bytes(),
            "gathered_state_sums": banks, "gathered_state_values": values,
            "gathered_state_scalars": {k: v for k, v in (state or {}).items() if isinstance(v, (int, float))}}


@contextlib.contextmanager
def parameter_peak():
    """The most parameter elements this process held at once while building networks (whole
    tensors plus ZeRO-3 partitions), sampled at every parameter registration and at the end."""
    held, peak = [], [0]

    def count() -> int:
        return sum(p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in held)

    def on_register(_module, _name, param):
        if param is not None:
            held.append(param)
            peak[0] = max(peak[0], count())

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(on_register)
    try:
        yield peak
    finally:
        handle.remove()
        peak[0] = max(peak[0], count())


def linear_stack() -> nn.Module:
    """16 equal layers: no one layer is a large share of the network."""
    return nn.Sequential(*(nn.Linear(32, 32) for _ in range(16)))


def run_teacher(ctx: DistContext) -> dict:
    """The frozen teacher under ZeRO-3, handed over whole and built partitioned
    (:mod:`kdscale.teachers.partitioned`): outputs against the unsharded teacher, parameters
    held per rank, and the peak held while building each way."""
    from kdscale.teachers.frozen import zero3_teacher_config
    from kdscale.teachers.partitioned import build_partitioned

    torch.manual_seed(1)
    teacher = PlainNet(32)
    reference = copy.deepcopy(teacher).eval().to(ctx.device)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)).to(ctx.device)
    with torch.no_grad():
        expected = reference(images)
    frozen = FrozenTeacher(teacher, ["layer2"], ctx.device, None, False, sharding="zero3", micro_batch=4)
    out = frozen(images)
    state = {k: v.detach().cpu().clone() for k, v in reference.state_dict().items()}
    built = FrozenTeacher(build_partitioned(lambda: PlainNet(32), state, zero3_teacher_config(4), "probe", ctx.device),
                          ["layer2"], ctx.device, None, False, sharding="zero3", micro_batch=4)
    built_out = built(images)
    with parameter_peak() as whole_peak:
        linear_stack()
    with parameter_peak() as partitioned_peak:
        build_partitioned(linear_stack, None, zero3_teacher_config(4), "probe", ctx.device)
    total = sum(p.numel() for p in reference.parameters())
    return {"max_abs_diff": (out.logits - expected).abs().max().item(),
            "local_parameters": frozen.local_parameter_count(),
            "total_parameters": total, "feature_shape": list(out.features["layer2"].shape),
            "built_max_abs_diff": (built_out.logits - expected).abs().max().item(),
            "built_local_parameters": built.local_parameter_count(),
            "built_feature_shape": list(built_out.features["layer2"].shape),
            "stack_parameters": sum(p.numel() for p in linear_stack().parameters()),
            "stack_layer_parameters": 32 * 32 + 32,
            "whole_build_peak": whole_peak[0], "partitioned_build_peak": partitioned_peak[0]}


def _resident_bytes(device: torch.device | None = None) -> int:
    """The memory the banks live in: the GPU's allocated bytes on a GPU, else this process's
    resident host memory."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_crd_bank(ctx: DistContext, samples: int, dim: int, batch: int, negatives: int, steps: int) -> dict:
    import statistics
    import time

    from kdscale.methods.contrast_memory import ContrastMemory, ContrastSampler

    ContrastMemory(1 << 13, dim, seed=1, device=ctx.device)  # first-use costs (threads, allocator) left out
    before = _resident_bytes(ctx.device)
    memory = ContrastMemory(samples, dim, seed=0, device=ctx.device)
    added = _resident_bytes(ctx.device) - before
    sampler = ContrastSampler(torch.arange(samples) % 1000, "other_class", seed=0)
    gen = torch.Generator().manual_seed(ctx.rank)
    times = []
    for step in range(steps + 1):
        v_s, v_t = (torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(ctx.device)
                    for _ in range(2))
        v_s.requires_grad_(True)
        indices = torch.randint(0, samples, (batch,), generator=gen).to(ctx.device)
        start = time.perf_counter()
        memory.contrast_loss(v_s, v_t, indices, sampler, negatives, 0.07, 0.5).backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return {"bank_bytes": memory.bytes_per_rank(), "resident_bytes_added": added, "rows": memory.rows,
            "step_seconds": statistics.median(times)}


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
