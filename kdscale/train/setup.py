"""Build everything a run needs from its config, failing early with clear errors.

All checks that can fail on user input (shards, models, weights, teacher/student class
counts, batch arithmetic) run here, before any training step.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from kdscale.config.schema import ExperimentConfig, ModelSpec
from kdscale.data.loader import check_shard_count
from kdscale.data.sample_index import sample_offsets, scan_labels
from kdscale.data.shards import expand_shards, samples_from_index
from kdscale.errors import KdscaleError
from kdscale.methods import Distiller, MethodContext, get_method_class
from kdscale.models import build_model
from kdscale.models.preprocessing import network_preprocessing
from kdscale.runtime.compile import (
    compile_in_place,
    compiles_networks,
    compiles_teacher,
    networks_of,
)
from kdscale.runtime.device import Runtime
from kdscale.teachers.frozen import FrozenTeacher, zero3_teacher_config
from kdscale.teachers.partitioned import build_partitioned, host_weights, shape_twin


@dataclasses.dataclass
class DataPlan:
    train_shards: list[str]
    val_shards: list[str]
    train_samples: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    sample_offsets: dict[str, int] | None = None
    """Shard name -> dataset index of its first sample, for methods with ``needs_sample_indices``."""
    dataset_size: int = 0
    """Samples in the training split that the indices number (``index.json``)."""


def plan_data(cfg: ExperimentConfig, world_size: int) -> DataPlan:
    data = cfg.data
    train = expand_shards(data.train_shards, "data.train_shards")
    val = expand_shards(data.val_shards, "data.val_shards")
    check_shard_count(train, "data.train_shards", world_size, data.num_workers)
    if cfg.teacher is not None and cfg.teacher.source == "shards":
        check_teacher_shards_usable(cfg, train)
    if data.decode == "gpu" and (data.augment != "imagenet" or (cfg.teacher is not None and
                                                                cfg.teacher.source == "shards")):
        raise KdscaleError("data.decode=gpu decodes random-resized crops of JPEGs on the device: it needs "
                           "data.augment=imagenet and an online teacher (or none); use data.decode=cpu")
    samples = data.train_samples or samples_from_index(train, "train")
    if not samples:
        raise KdscaleError("data.train_samples is not set and no index.json beside the training shards records "
                           "their sample count; set data.train_samples to the number of training images")
    accum = cfg.train.grad_accum_steps
    global_batch = data.batch_size * world_size * accum
    steps = samples // global_batch
    if steps < 1:
        raise KdscaleError(f"data.train_samples={samples} is smaller than one global batch "
                           f"(data.batch_size={data.batch_size} x {world_size} processes x "
                           f"train.grad_accum_steps={accum} = {global_batch}); lower data.batch_size")
    plan = DataPlan(train, val, samples, steps * accum, steps)
    if get_method_class(cfg.method.name).needs_sample_indices:
        plan.sample_offsets, plan.dataset_size = sample_offsets(train, "data.train_shards")
    return plan


def training_labels(plan: DataPlan, ctx, on_shard=None) -> torch.Tensor | None:
    """The label of every training sample by dataset index, for methods that number the
    samples (read from the shards' ``.cls`` members, each rank a share of the shards;
    ``on_shard``: called after each, e.g. the stall watchdog's progress)."""
    if plan.sample_offsets is None:
        return None
    from kdscale.log import log

    log.info(f"reading the labels of {plan.dataset_size} training samples (the method keeps state per sample)")
    return scan_labels(plan.train_shards, plan.sample_offsets, plan.dataset_size, ctx, on_shard)


def check_teacher_shards_usable(cfg: ExperimentConfig, train_shards: list[str]) -> None:
    from kdscale.data.teacher_outputs import check_teacher_outputs

    method_cls = get_method_class(cfg.method.name)
    if method_cls.teacher_role != "frozen":
        raise KdscaleError(f"teacher.source=shards gives a method a frozen teacher's logits (stored top-k "
                           f"probabilities); method {method_cls.name!r} has "
                           f"{'no teacher' if method_cls.teacher_role == 'none' else 'a teacher it trains'}: "
                           f"remove the teacher section or use teacher.source=online")
    if not cfg.teacher.outputs:
        raise KdscaleError("teacher.source=shards needs teacher.outputs: the directory written by kdscale.teach")
    if cfg.data.augment != "imagenet":
        raise KdscaleError("teacher.source=shards replays stored random-resized crops; set data.augment=imagenet "
                           "(the crops kdscale.teach stored)")
    check_teacher_outputs(train_shards, cfg.teacher.outputs, cfg.data.num_classes)


def _build(spec: ModelSpec, num_classes: int, where: str) -> nn.Module:
    return build_model(spec.name, spec.num_classes or num_classes, spec.weights, where=where)


def _output_classes(model: nn.Module, size: tuple[int, int]) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():  # on the model's device: a ZeRO-3 teacher's shape twin is on ``meta``
        out = model(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    model.train(was_training)
    return out.shape[-1]


def _check_same_classes(cfg: ExperimentConfig, student: nn.Module, teacher: nn.Module, frozen: bool) -> None:
    """Both predict the same classes; each is run at the size it will see (a frozen teacher at
    its own input size: a 384-px ViT accepts nothing else)."""
    size = (cfg.data.image_size, cfg.data.image_size)
    student_classes = _output_classes(student, size)
    teacher_size = network_preprocessing(cfg.data, cfg.teacher).input_size if frozen else size
    teacher_classes = _output_classes(teacher, teacher_size)
    if student_classes != teacher_classes:
        raise KdscaleError(f"teacher {cfg.teacher.name} predicts {teacher_classes} classes but student "
                           f"{cfg.student.name} predicts {student_classes}; they must match "
                           f"(check teacher.num_classes, student.num_classes and data.num_classes)")


def check_compile_fits(cfg: ExperimentConfig, strategy: str) -> None:
    """``train.compile`` of the trained networks needs them whole: ZeRO-3 gathers each
    module's parameters in forward hooks, where torch.compile breaks the graph and recompiles
    per module type (measured on CPU, resnet8 on 2 ranks: dynamo's recompile limit hit in
    DeepSpeed's ``parameter_offload`` hooks, 70 s of compiling, no whole graph)."""
    if compiles_networks(cfg.train.compile) and strategy == "zero3":
        raise KdscaleError(f"train.compile={cfg.train.compile} compiles the trained networks, which "
                           f"distributed.strategy=zero3 partitions (DeepSpeed gathers their parameters in module "
                           f"hooks that torch.compile cannot trace); use distributed.strategy=zero2 or "
                           f"train.compile=teacher/none")


def _check_teacher_sharding(cfg: ExperimentConfig, method_name: str, role: str, world_size: int) -> None:
    sharding = cfg.distributed.teacher_sharding
    if compiles_teacher(cfg.train.compile) and sharding == "zero3":
        raise KdscaleError(f"train.compile={cfg.train.compile} compiles the frozen teacher, which "
                           f"distributed.teacher_sharding=zero3 partitions (DeepSpeed swaps its parameters in hooks); "
                           f"use train.compile=networks or distributed.teacher_sharding=replicated")
    if sharding == "zero3" and role != "frozen":
        raise KdscaleError(f"distributed.teacher_sharding=zero3 applies to frozen teachers; method "
                           f"{method_name!r} has {'none' if role == 'none' else 'a trained teacher'} "
                           f"(use distributed.strategy=zero3 to shard trained networks)")
    if sharding == "zero3" and world_size < 2:
        raise KdscaleError("distributed.teacher_sharding=zero3 partitions the teacher across processes, but this "
                           "run has 1; launch at least 2 processes or use distributed.teacher_sharding=replicated")


def build_distiller(cfg: ExperimentConfig, runtime: Runtime, world_size: int = 1,
                    train_labels: torch.Tensor | None = None) -> tuple[Distiller, FrozenTeacher | None]:
    """The method with its trained networks on the device, and the frozen teacher (None when
    the method has none or it is replayed from shards). A ZeRO-3-sharded frozen teacher is
    built partitioned (:mod:`kdscale.teachers.partitioned`); the method then sees its shape twin."""
    method_cls = get_method_class(cfg.method.name)
    num_classes = cfg.data.num_classes
    student = _build(cfg.student, num_classes, "student")
    teacher_model = None
    role = method_cls.teacher_role
    from_shards = cfg.teacher is not None and cfg.teacher.source == "shards"
    _check_teacher_sharding(cfg, method_cls.name, role, world_size)
    partitioned = role == "frozen" and not from_shards and cfg.distributed.teacher_sharding == "zero3"
    if role != "none" and not from_shards:
        if cfg.teacher is None or not cfg.teacher.name:
            what = "a frozen teacher: set teacher.name and teacher.weights (e.g. a vanilla run's export)" \
                if role == "frozen" else "a teacher network to train with the student: set teacher.name"
            raise KdscaleError(f"method {method_cls.name!r} needs {what}")
        if role == "frozen" and not cfg.teacher.weights:
            warnings.warn("teacher.weights is not set: distilling from a randomly initialised teacher",
                          stacklevel=2)
        if partitioned:
            teacher_classes = cfg.teacher.num_classes or num_classes
            teacher_weights = host_weights(cfg.teacher.name, teacher_classes, cfg.teacher.weights, where="teacher")
            teacher_model = shape_twin(lambda: build_model(cfg.teacher.name, teacher_classes, where="teacher"))
        else:
            teacher_model = _build(cfg.teacher, num_classes, "teacher")
        if role == "frozen":
            _check_same_classes(cfg, student, teacher_model, frozen=True)
    elif cfg.teacher is not None and not from_shards:
        warnings.warn(f"method {method_cls.name!r} uses no teacher; the teacher section is ignored", stacklevel=2)
    context = MethodContext(num_classes=num_classes, image_size=cfg.data.image_size, method_name=method_cls.name,
                        student_name=cfg.student.name,
                        teacher_name=cfg.teacher.name if teacher_model is not None else "",
                        label_smoothing=cfg.train.label_smoothing, teacher_network=teacher_model, teacher_role=role,
                        teacher_pretrained=teacher_model is not None and bool(cfg.teacher.weights),
                        build_model=lambda name: build_model(name, num_classes, where="method"),
                        seed=cfg.experiment.seed, train_labels=train_labels)
    distiller = method_cls(student, cfg.method.params, context)
    needs = distiller.teacher_needs()
    if from_shards and needs.features:
        raise KdscaleError(f"method {method_cls.name!r} needs features: use teacher.source=online (it reads the "
                           f"teacher's {', '.join(needs.features)}; teacher.source=shards replays logits only)")
    if role == "trainable" and teacher_model is not None:  # checked after the method may have re-headed it
        _check_same_classes(cfg, student, distiller.teacher, frozen=False)
    frozen = None
    if role == "frozen" and not from_shards:
        if partitioned:
            teacher_model = build_partitioned(
                lambda: build_model(cfg.teacher.name, teacher_classes, where="teacher"), teacher_weights,
                zero3_teacher_config(cfg.data.batch_size, runtime.autocast_dtype),
                where=f"teacher.weights={cfg.teacher.weights}", device=runtime.device)
        frozen = FrozenTeacher(teacher_model, list(needs.features), runtime.device,
                               runtime.autocast_dtype, runtime.channels_last,
                               sharding=cfg.distributed.teacher_sharding, micro_batch=cfg.data.batch_size,
                               compile=compiles_teacher(cfg.train.compile))
    memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
    distiller.to(runtime.device, memory_format=memory_format)
    if compiles_networks(cfg.train.compile):
        compile_in_place(networks_of(distiller))
    return distiller, frozen
