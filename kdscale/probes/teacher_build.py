"""The ``teacher`` probe: a frozen teacher partitioned by ZeRO-3, handed over whole and built
partitioned (:mod:`kdscale.teachers.partitioned`). Records its outputs' difference to the
unsharded teacher, the parameters each rank holds, and the peak parameters held while
building it each way."""

from __future__ import annotations

import contextlib
import copy

import torch

from kdscale.parallel.context import DistContext
from kdscale.probes.networks import PlainNet, linear_stack
from kdscale.teachers.frozen import FrozenTeacher, zero3_teacher_config
from kdscale.teachers.partitioned import build_partitioned


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


def run_teacher(ctx: DistContext) -> dict:
    """The frozen teacher under ZeRO-3, handed over whole and built partitioned
    (:mod:`kdscale.teachers.partitioned`): outputs against the unsharded teacher, parameters
    held per rank, and the peak held while building each way."""
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
