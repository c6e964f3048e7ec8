"""Build everything a run needs from its config, failing early with clear errors.

All checks that can fail on user input (shards, models, weights, teacher/student class
counts, batch arithmetic) run here, before any training step.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdscale.config.schema import ExperimentConfig
from kdscale.data.loader import check_shard_count
from kdscale.data.sample_index import sample_offsets, scan_labels
from kdscale.data.shards import expand_shards, recorded_unlabelled, samples_from_index
from kdscale.errors import KdscaleError
from kdscale.methods import Distiller, MethodContext, get_method_class
from kdscale.models import build_model
from kdscale.runtime.compile import compile_in_place, compiles_networks, networks_of
from kdscale.runtime.device import Runtime
from kdscale.teachers.frozen import FrozenTeacher
from kdscale.train.teacher_setup import (
    check_same_classes,
    feature_network,
    frozen_teachers,
    replayed_specs,
    replayed_target_shapes,
    target_shapes,
    teacher_networks,
    teacher_weights,
)


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
    check_labels(cfg, train)
    check_shard_count(train, "data.train_shards", world_size, data.num_workers)
    if replayed_specs(cfg):
        check_teacher_shards_usable(cfg, train)
    if data.decode == "gpu" and (data.augment != "imagenet" or replayed_specs(cfg)):
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


def check_labels(cfg: ExperimentConfig, train_shards: list[str]) -> None:
    """``data.labels`` against the method, mixing and the shards, in one line each:
    ``none`` needs a method whose terms need no labels (``Distiller.labels_needed`` False) and
    no Mixup/CutMix (they build soft targets from labels); ``required`` refuses training
    shards whose ``index.json`` records their split as unlabelled (``"labelled": false``)."""
    import os

    data, method_cls = cfg.data, get_method_class(cfg.method.name)
    if data.labels == "none":
        if method_cls.labels_needed(cfg.method.params):
            which = "" if method_cls.needs_labels else " for a term its settings turn on (set that term's weight, " \
                "e.g. method.ce_weight, to 0)"
            raise KdscaleError(f"data.labels=none trains on images without labels, but method {method_cls.name!r} "
                               f"needs labels{which}; use a method that needs none, or labelled shards with "
                               f"data.labels=required")
        if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
            raise KdscaleError(f"data.labels=none with Mixup/CutMix (data.mixup_alpha={data.mixup_alpha}, "
                               f"data.cutmix_alpha={data.cutmix_alpha}): mixing builds soft targets from labels; "
                               f"set both to 0")
        return
    folder = os.path.dirname(train_shards[0])
    unlabelled = recorded_unlabelled(train_shards)
    if unlabelled:
        raise KdscaleError(f"data.train_shards: the shards in {folder or '.'} are unlabelled (index.json: split "
                           f"{unlabelled[0]!r}) and data.labels=required; use data.labels=none with a method that "
                           f"needs no labels, or labelled shards")


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
    """Every replayed teacher (``source: shards``): the method takes a frozen teacher's outputs,
    its outputs cover the shards and store the targets its entry asks for (feature targets
    never mixed: Mixup/CutMix has no rule for them), and several replayed teachers stored the
    same crops."""
    from kdscale.config.teachers import teacher_key
    from kdscale.data.mixing import mixing_enabled
    from kdscale.data.teacher_outputs import check_same_crops, check_teacher_outputs

    method_cls = get_method_class(cfg.method.name)
    metas = {}
    for spec in cfg.teachers:
        if spec.source != "shards":
            continue
        key = teacher_key(cfg, spec)
        if method_cls.teacher_role != "frozen":
            raise KdscaleError(f"{key}.source=shards gives a method a frozen teacher's logits (stored top-k "
                               f"probabilities); method {method_cls.name!r} has "
                               f"{'no teacher' if method_cls.teacher_role == 'none' else 'a teacher it trains'}: "
                               f"remove the teacher section or use {key}.source=online")
        if not spec.outputs:
            raise KdscaleError(f"{key}.source=shards needs {key}.outputs: the directory written by kdscale.teach")
        if cfg.data.augment != "imagenet":
            raise KdscaleError(f"{key}.source=shards replays stored random-resized crops; set data.augment=imagenet "
                               f"(the crops kdscale.teach stored)")
        metas[spec.outputs] = check_teacher_outputs(train_shards, spec.outputs, cfg.data.num_classes)
        if replayed_target_shapes(cfg, spec, metas[spec.outputs]) and mixing_enabled(cfg.data):
            raise KdscaleError(f"{key}.source=shards replays feature targets, which Mixup/CutMix cannot mix "
                               f"(data.mixup_alpha={cfg.data.mixup_alpha}, data.cutmix_alpha={cfg.data.cutmix_alpha}); "
                               f"set both to 0, or use {key}.source=online")
    if len(metas) > 1:
        check_same_crops(metas)


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


def build_distiller(cfg: ExperimentConfig, runtime: Runtime, world_size: int = 1,
                    train_labels: torch.Tensor | None = None) -> tuple[Distiller, dict[str, FrozenTeacher]]:
    """The method with its trained networks on the device, and each online frozen teacher by
    id (none when the method has none or every teacher is replayed from shards;
    :mod:`kdscale.train.teacher_setup`). A ZeRO-3-sharded frozen teacher is built partitioned
    (:mod:`kdscale.teachers.partitioned`); the method then sees its shape twin."""
    method_cls = get_method_class(cfg.method.name)
    num_classes = cfg.data.num_classes
    student = build_model(cfg.student.name, cfg.student.num_classes or num_classes, cfg.student.weights,
                          where="student", timm_options=cfg.student.timm_options)
    role = method_cls.teacher_role
    builds = teacher_networks(cfg, method_cls, student, world_size)
    network = feature_network(cfg, builds)
    context = MethodContext(num_classes=num_classes, image_size=cfg.data.image_size, method_name=method_cls.name,
                            student_name=cfg.student.name,
                            teacher_name=next((b.spec.name for b in builds if b.network is network), "")
                            if network is not None else "",
                            label_smoothing=cfg.train.label_smoothing, teacher_network=network, teacher_role=role,
                            teacher_pretrained=any(b.network is network and bool(b.spec.weights) for b in builds),
                            teacher_ids=tuple(b.spec.id for b in builds) if role == "frozen" else (),
                            teacher_targets=target_shapes(cfg, builds) if role == "frozen" else {},
                            teacher_weights=teacher_weights(cfg) if role == "frozen" else {},
                            build_model=lambda name: build_model(name, num_classes, where="method"),
                            seed=cfg.experiment.seed, train_labels=train_labels)
    distiller = method_cls(student, cfg.method.params, context)
    if role == "trainable":  # checked after the method may have re-headed it
        check_same_classes(cfg, student, distiller.teacher, builds[0].spec, frozen=False)
    frozen = frozen_teachers(cfg, builds, distiller.teacher_needs(), method_cls.name, runtime) \
        if role == "frozen" else {}
    memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
    distiller.to(runtime.device, memory_format=memory_format)
    if compiles_networks(cfg.train.compile):
        compile_in_place(networks_of(distiller))
    return distiller, frozen
