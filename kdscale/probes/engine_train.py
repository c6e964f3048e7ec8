"""The ``train`` probe: a few steps of one method under one engine (``ddp``, ``zero1``..``zero3``)
on the fixed global batches, so a 2-rank run is mathematically the 1-rank run with each
global batch split in two. Records the global mean loss per step, the trained student's
weights at the end (gathered whole: sums and its first values), optimizer-state, parameter
and gradient bytes, the parameters this rank's optimizer holds, and the
method's per-sample state (CRD's banks) gathered whole. ``params`` set method parameters;
the rest keep their defaults, except ``teachers=2``: a second frozen teacher beside the
first (:func:`two_teachers`)."""

from __future__ import annotations

import contextlib

import torch

from kdscale.config import load_config
from kdscale.engines import make_engine
from kdscale.methods import MethodContext, get_method_class
from kdscale.parallel.context import DistContext
from kdscale.probes.networks import (
    CLASSES,
    GLOBAL_BATCH,
    SAMPLES,
    PlainNet,
    global_batches,
)
from kdscale.models.preprocessing import Preprocessing
from kdscale.models.feature_targets import FeatureTargets
from kdscale.teachers.frozen import FrozenTeacher, zero3_teacher_config
from kdscale.teachers.partitioned import build_partitioned
from kdscale.teachers.views import TeacherView
from kdscale.train.teacher_source import Member, TeacherSource


def two_teachers(first: FrozenTeacher, ctx: DistContext, micro_batch: int) -> TeacherSource:
    """The probe's first teacher (weight 0.3) and a wider second one (weight 0.7) with its own
    view (20 px, other mean and std), ZeRO-3-partitioned on several ranks (replicated on one:
    the same function), as a run with two teachers combines them."""
    torch.manual_seed(7)
    state = PlainNet(32).state_dict()
    if ctx.world_size > 1:
        network = build_partitioned(lambda: PlainNet(32), state, zero3_teacher_config(micro_batch), "probe",
                                    ctx.device)
    else:
        network = PlainNet(32)
        network.load_state_dict(state)
    view = TeacherView(Preprocessing((0.0,) * 3, (1.0,) * 3, (16, 16)),
                       Preprocessing((0.1, 0.2, 0.3), (0.5, 0.6, 0.7), (20, 20), "probe"))
    second = FrozenTeacher(network, [], ctx.device, None, False, view=view,
                           sharding="zero3" if ctx.world_size > 1 else "replicated", micro_batch=micro_batch)
    return TeacherSource([Member("a", 0.3, first), Member("b", 0.7, second)], "a")


def run_train(strategy: str, method_name: str, ctx: DistContext, params: dict | None = None) -> dict:
    per_rank = GLOBAL_BATCH // ctx.world_size
    params = dict(params or {})
    teachers = params.pop("teachers", 1)
    cfg = load_config(None, [f"distributed.strategy={strategy}", f"data.batch_size={per_rank}",
                             "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.01"])
    torch.manual_seed(0)
    teacher_width = 16 if (params or {}).get("share_trunk") else 24  # a shared trunk needs the same widths
    student, teacher = PlainNet(16), PlainNet(teacher_width)
    cls = get_method_class(method_name)
    mctx = MethodContext(num_classes=CLASSES, image_size=16, method_name=method_name, teacher_network=teacher,
                         teacher_role=cls.teacher_role, teacher_name="plain24",
                         teacher_pretrained=True, build_model=lambda _name: PlainNet(24),
                         teacher_ids=("a", "b") if teachers == 2 else ("teacher",),
                         train_labels=torch.arange(SAMPLES) % CLASSES)
    targets = None
    if method_name == "features":  # the plain nets' maps are layer2's outputs (no avgpool module)
        params.setdefault("student_spatial_layer", "layer2")
        targets = FeatureTargets(teacher, ["summary", "spatial"], where="teacher", spatial_layer="layer2")
        mctx.teacher_targets, mctx.teacher_weights = {"teacher": targets.shapes((16, 16))}, {"teacher": 1.0}
    distiller = cls(student, cls.Params(**params), mctx).train().to(ctx.device)
    frozen = FrozenTeacher(teacher, list(distiller.teacher_needs().features), ctx.device, None, False,
                           targets=targets) if cls.teacher_role == "frozen" else None
    if targets is not None:
        frozen = TeacherSource([Member("teacher", 1.0, frozen)], None)
    if teachers == 2:
        frozen = two_teachers(frozen, ctx, per_rank)
    engine = make_engine(strategy, distiller, cfg, ctx)
    losses = []
    for images, targets, indices in global_batches():
        mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        images, targets, indices = (t[mine].to(ctx.device) for t in (images, targets, indices))
        teacher_output = (frozen(images, None) if isinstance(frozen, TeacherSource) else frozen(images)) \
            if frozen else None
        step_total = 0.0
        for phase in distiller.phases():
            terms, _ = engine.micro_step(phase, images, targets, teacher_output, True, 0.01, contextlib.nullcontext,
                                         sample_indices=indices)
            step_total += sum(t.detach() for t in terms.values())
        losses.append(ctx.all_reduce(torch.as_tensor(step_total).reshape(1).float(), "mean").item())
    state = distiller.gathered_state()  # per-sample state (CRD's banks), gathered whole
    banks = {k: v.double().sum().item() for k, v in (state or {}).items() if torch.is_tensor(v)}
    values = {k: v.flatten().tolist() for k, v in (state or {}).items() if torch.is_tensor(v) and v.numel() <= 4096}
    trainable = sum(p.numel() for p in distiller.parameters())  # ZeRO-3 keeps these small parameters whole here
    per_network = sum(p.numel() for net in distiller.children() for p in net.parameters())
    result = {"losses": losses, "optimizer_state_bytes": engine.optimizer_state_bytes(),
              "optimizer_parameters": engine.optimizer_parameter_count(), "per_network_parameters": per_network,
              "local_parameters": engine.local_parameter_count(), "trainable_parameters": trainable,
              "parameter_bytes": engine.local_parameter_count() * 4, "gradient_bytes": engine.gradient_bytes(),
              "gathered_state_sums": banks, "gathered_state_values": values,
              "gathered_state_scalars": {k: v for k, v in (state or {}).items() if isinstance(v, (int, float))}}
    # Last: gathering re-partitions ZeRO-3's small persistent parameters, which the counts above see whole.
    weights = torch.cat([v.double().flatten() for v in engine.gathered_student_state().values()])  # a collective
    return {**result, "student_weights_head": weights[:256].tolist(), "student_weights_sum": weights.sum().item(),
            "student_weights_abs_sum": weights.abs().sum().item()}
