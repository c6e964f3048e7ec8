"""Activation bytes of a training step, measured for ``kdscale plan`` (:mod:`kdscale.planning.memory`).

One forward+backward of the real networks on CPU at two small batches under the config's
autocast, summing the distinct storages saved for backward (``saved_tensors_hooks``; weights
excluded, their bf16 casts included) and the frozen teachers' outputs alive through the step
(every teacher's logits, their mean, the feature teacher's features, every teacher's summary
and spatial targets), scaled linearly in batch
and ``image_size²``. A network that accepts only its own input size (a timm ViT's strict
``patch_embed.img_size``; or one whose probe at the small side fails) is probed at
``data.image_size`` itself: the per-sample cost still comes from the two batches, and nothing
is scaled by area. The teachers' output comes from the trainer's own
:class:`~kdscale.train.teacher_source.TeacherSource`: every online teacher runs (in its own
view), every replayed one gives the log of random stored probabilities.
"""

from __future__ import annotations

import dataclasses

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.errors import KdscaleError
from kdscale.log import log
from kdscale.runtime.device import autocast as run_autocast

PROBE_BATCHES = (2, 4)
PROBE_SIDE = 128  # activations are measured at min(image_size, 128) px and scaled by area
#                   (a network with a fixed input size: at image_size)


@dataclasses.dataclass
class ActivationEstimate:
    """``constant + per_sample * batch * (side / probe_side)²`` bytes."""

    constant: int
    per_sample: int
    probe_side: int

    def at(self, batch: int, side: int) -> int:
        return int(self.constant + self.per_sample * batch * (side / self.probe_side) ** 2)


def step_source(cfg: ExperimentConfig, frozen: dict, distiller):
    """The step's teacher source as the trainer builds it (a watchdog that is never started:
    the source only names what it waits for). Online teachers given without ``cfg.teachers``
    (networks built by hand) are members of equal weight, the first giving the features."""
    from kdscale.lifecycle.watchdog import Watchdog
    from kdscale.train.teacher_source import Member, TeacherSource, teacher_source

    watchdog = Watchdog(60, 0)
    if frozen and not cfg.teachers:
        members = [Member(tid, 1 / len(frozen), teacher) for tid, teacher in frozen.items()]
        return TeacherSource(members, next(iter(frozen)), watchdog)
    return teacher_source(cfg, frozen, watchdog, type(distiller).teacher_role == "frozen")


def _storage(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _saved_in_phase(distiller, phase: str, inputs: tuple, kept: list, autocast) -> int:
    """Bytes of the distinct storages one phase's forward saves for its backward, weights
    excluded, plus those of ``kept`` (the teachers' outputs, alive through the step)."""
    weights = {_storage(p)[0] for p in distiller.parameters()}
    saved = dict(map(_storage, kept))

    def pack(tensor):
        ptr, nbytes = _storage(tensor)
        if ptr not in weights:
            saved[ptr] = nbytes
        return tensor

    extra = {"sample_indices": torch.arange(len(inputs[0]))} if distiller.needs_sample_indices else {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        _logits, losses = distiller(*inputs, phase=phase, **extra)
        loss = sum(losses.values())
    if loss.requires_grad:
        loss.backward()
    distiller.zero_grad(set_to_none=True)
    return sum(saved.values())


def saved_bytes(distiller, source, cfg: ExperimentConfig, batch: int, side: int, autocast_dtype) -> int:
    """Activation bytes of one training step at ``batch`` x ``side``px: the largest phase.
    ``source``: the step's :class:`~kdscale.train.teacher_source.TeacherSource`."""
    images = torch.randn(batch, 3, side, side)
    targets = torch.randint(0, cfg.data.num_classes, (batch,))
    replayed = len(source.outputs_dirs)
    probs = torch.randn(batch, replayed, cfg.data.num_classes).softmax(-1) if replayed else None
    teacher_output = source(images, probs)
    kept = [] if teacher_output is None else [teacher_output.logits, *teacher_output.members.values(),
                                              *teacher_output.features.values(),
                                              *(t for f in teacher_output.member_features.values() for t in f.values())]
    kept = [tensor for tensor in kept if tensor is not None]  # a features-only teacher gives no logits
    autocast = run_autocast("cpu", autocast_dtype)
    return max(_saved_in_phase(distiller, phase, (images, targets, teacher_output), kept, autocast)
               for phase in distiller.phases())


def fixed_input_sizes(distiller, source) -> dict[str, tuple[int, int]]:
    """The input sizes the step's networks require, by module name: the trained networks and
    every online frozen teacher that sees the student's batch as it is (a teacher with its own
    view gets its own input size). A timm ``PatchEmbed`` with ``strict_img_size`` asserts its
    ``img_size``."""
    networks = [("", distiller)] + [(f"teacher {tid}.", frozen.model) for tid, frozen in source.online.items()
                                    if frozen.view is None or frozen.view.identity]
    sizes = {}
    for prefix, network in networks:
        for name, module in network.named_modules():
            size = getattr(module, "img_size", None)
            if getattr(module, "strict_img_size", False) and size is not None:
                sizes[prefix + name] = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return sizes


def measure_activations(distiller, source, cfg: ExperimentConfig, autocast_dtype) -> ActivationEstimate:
    image_size = cfg.data.image_size
    fixed = fixed_input_sizes(distiller, source)
    wrong = {name: size for name, size in fixed.items() if size != (image_size, image_size)}
    if wrong:
        name, size = next(iter(wrong.items()))
        raise KdscaleError(f"data.image_size is {image_size} but {name or 'the student'} accepts only "
                           f"{size[0]}x{size[1]} px inputs: set data.image_size={size[0]}")
    side = image_size if fixed else min(image_size, PROBE_SIDE)
    try:
        small, large = (saved_bytes(distiller, source, cfg, b, side, autocast_dtype) for b in PROBE_BATCHES)
    except (AssertionError, RuntimeError, ValueError) as error:
        if side == image_size:
            raise
        log.info(f"plan: activations probed at data.image_size={image_size}px (at {side}px: {error})")
        side = image_size  # a network that takes only its own input size, found by running it
        small, large = (saved_bytes(distiller, source, cfg, b, side, autocast_dtype) for b in PROBE_BATCHES)
    per_sample = max(0, (large - small) // (PROBE_BATCHES[1] - PROBE_BATCHES[0]))
    return ActivationEstimate(max(0, small - per_sample * PROBE_BATCHES[0]), per_sample, side)
