"""The run's teachers, built from ``cfg.teachers`` with every check that can fail on them.

A run has any number of frozen teachers, each with its own view (:mod:`kdscale.teachers.views`),
placement (``sharding``: replicated or ZeRO-3-partitioned) and source (``online``, or
replayed from its teacher-output shards), or the one teacher a method trains (ProKT, FFCL).
The method is built between :func:`teacher_networks` (what it may read: the feature
teacher's network) and :func:`frozen_teachers` (each online teacher wrapped to run, with
taps on the feature teacher only, once the method has said which layers it reads).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from kdscale.config.schema import ExperimentConfig, TeacherSpec
from kdscale.config.teachers import feature_teacher_id, teacher_key
from kdscale.errors import KdscaleError
from kdscale.methods import TeacherNeeds
from kdscale.models import build_model
from kdscale.models.feature_targets import FeatureTargets
from kdscale.models.preprocessing import network_preprocessing
from kdscale.runtime.compile import compiles_teacher
from kdscale.runtime.device import Runtime
from kdscale.teachers.frozen import FrozenTeacher, zero3_teacher_config
from kdscale.teachers.partitioned import build_partitioned, host_weights, shape_twin


@dataclasses.dataclass
class TeacherBuild:
    """One teacher entry as built so far."""

    spec: TeacherSpec
    key: str
    """Its name in messages: ``teacher`` or ``teachers[i]``."""
    sharding: str
    network: nn.Module | None = None
    """Online: the network (a ZeRO-3 teacher's shape twin on ``meta``); replayed: None."""
    classes: int = 0
    weights: dict | None = None
    """A ZeRO-3 teacher's weights, on the host until it is built partitioned."""

    @property
    def replayed(self) -> bool:
        return self.spec.source == "shards"


def replayed_specs(cfg: ExperimentConfig) -> list[TeacherSpec]:
    return [spec for spec in cfg.teachers if spec.source == "shards"]


def check_teacher_placement(cfg: ExperimentConfig, method_name: str, role: str, world_size: int) -> None:
    shardings = {teacher_key(cfg, s): cfg.teacher_sharding(s) for s in cfg.teachers if s.source == "online"}
    zero3 = [key for key, sharding in shardings.items() if sharding == "zero3"]
    if cfg.distributed.teacher_sharding == "zero3" and not shardings:
        zero3 = ["distributed"]
    if not zero3:
        return
    what = "distributed.teacher_sharding=zero3" if zero3 == ["distributed"] or len(cfg.teachers) == 1 \
        else f"{zero3[0]}.sharding=zero3"
    if compiles_teacher(cfg.train.compile):
        raise KdscaleError(f"train.compile={cfg.train.compile} compiles the frozen teachers, which {what} "
                           f"partitions (DeepSpeed swaps its parameters in hooks); use train.compile=networks or "
                           f"replicated teachers")
    if role != "frozen":
        raise KdscaleError(f"{what} applies to frozen teachers; method {method_name!r} has "
                           f"{'none' if role == 'none' else 'a trained teacher'} "
                           f"(use distributed.strategy=zero3 to shard trained networks)")
    if world_size < 2:
        raise KdscaleError(f"{what} partitions the teacher across processes, but this run has 1; launch at least 2 "
                           f"processes or use distributed.teacher_sharding=replicated")


def _output_classes(model: nn.Module, size: tuple[int, int], what: str, fix: str) -> int:
    """The classes ``model`` predicts for one ``size`` image; a network that refuses the size (a
    ViT built for another resolution) is one line naming ``what`` and the ``fix``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # on the model's device: a ZeRO-3 teacher's shape twin is on ``meta``
            out = model(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    except (AssertionError, RuntimeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KdscaleError(f"{what} does not accept {size[0]}x{size[1]} px inputs ({reason}); {fix}") from None
    finally:
        model.train(was_training)
    return out.shape[-1]


def check_same_classes(cfg: ExperimentConfig, student: nn.Module, teacher: nn.Module, spec: TeacherSpec,
                       frozen: bool) -> None:
    """Both predict the same classes; each is run at the size it will see (a frozen teacher at
    its own input size: a 384-px ViT accepts nothing else)."""
    size = (cfg.data.image_size, cfg.data.image_size)
    key = teacher_key(cfg, spec)
    student_classes = _output_classes(student, size, f"student {cfg.student.name}",
                                      "set data.image_size to the size it was built for")
    teacher_size = network_preprocessing(cfg.data, spec, key).input_size if frozen else size
    teacher_classes = _output_classes(teacher, teacher_size, f"{key} {spec.name}",
                                      f"set {key}.input_size to the size it was built for" if frozen else
                                      "set data.image_size to the size it was built for")
    if student_classes != teacher_classes:
        raise KdscaleError(f"{key} {spec.name} predicts {teacher_classes} classes but student {cfg.student.name} "
                           f"predicts {student_classes}; they must match (check {key}.num_classes, "
                           f"student.num_classes and data.num_classes)")


def teacher_networks(cfg: ExperimentConfig, method_cls, student: nn.Module, world_size: int) -> list[TeacherBuild]:
    """Every teacher entry, its network built (random weights warned about) and checked against
    the student; none for a method without a teacher (a teacher section is then ignored, with
    a warning)."""
    role = method_cls.teacher_role
    check_teacher_placement(cfg, method_cls.name, role, world_size)
    if role == "none":
        if cfg.teachers and not replayed_specs(cfg):
            warnings.warn(f"method {method_cls.name!r} uses no teacher; the teacher section is ignored", stacklevel=3)
        return []
    if role == "trainable":
        cfg.only_teacher(f"method {method_cls.name!r} (it trains its teacher)")
    if not cfg.teachers or not all(spec.name or spec.source == "shards" for spec in cfg.teachers):
        what = "a frozen teacher: set teacher.name and teacher.weights (e.g. a vanilla run's export)" \
            if role == "frozen" else "a teacher network to train with the student: set teacher.name"
        raise KdscaleError(f"method {method_cls.name!r} needs {what}")
    builds = []
    for spec in cfg.teachers:
        key = teacher_key(cfg, spec)
        build = TeacherBuild(spec, key, cfg.teacher_sharding(spec), classes=teacher_classes(cfg, spec))
        builds.append(build)
        if build.replayed:
            continue
        if role == "frozen" and not spec.weights:
            warnings.warn(f"{key}.weights is not set: distilling from a randomly initialised teacher", stacklevel=3)
        if role == "frozen" and build.sharding == "zero3":
            build.weights = host_weights(spec.name, build.classes, spec.weights, where=key,
                                         timm_options=spec.timm_options)
            build.network = shape_twin(lambda: build_model(spec.name, build.classes, where=key,
                                                           timm_options=spec.timm_options))
        else:
            build.network = build_model(spec.name, build.classes, spec.weights, where=key,
                                        timm_options=spec.timm_options)
        if role == "frozen" and "logits" in teacher_kinds(spec):  # a features-only teacher's head is unused
            check_same_classes(cfg, student, build.network, spec, frozen=True)
    return builds


def teacher_classes(cfg: ExperimentConfig, spec: TeacherSpec) -> int:
    """The classes a teacher is built with: its ``num_classes``, else ``data.num_classes``; a
    timm teacher that teaches features only is built without a classifier (0: a weights file
    holding one then needs the entry's ``num_classes``, which the load error names)."""
    if spec.num_classes:
        return spec.num_classes
    if "logits" not in teacher_kinds(spec) and spec.name.startswith("timm:"):
        return 0
    return cfg.data.num_classes


def teacher_weights(cfg: ExperimentConfig) -> dict[str, float]:
    """Each teacher's ``weight`` by id, normalised to sum to 1."""
    total = sum(spec.weight for spec in cfg.teachers)
    return {spec.id: spec.weight / total for spec in cfg.teachers}


def teacher_kinds(spec: TeacherSpec) -> tuple[str, ...]:
    """What a teacher entry teaches: its ``targets``, default its logits."""
    return tuple(spec.targets) if spec.targets else ("logits",)


def feature_kinds(spec: TeacherSpec) -> list[str]:
    return [kind for kind in teacher_kinds(spec) if kind != "logits"]


def feature_targets_of(build: TeacherBuild, network: nn.Module, logits: bool = False) -> FeatureTargets:
    spec = build.spec
    return FeatureTargets(network, feature_kinds(spec), where=build.key, spatial_layer=spec.spatial_layer,
                          summary_layer=spec.summary_layer, logits=logits)


def target_shapes(cfg: ExperimentConfig, builds: list[TeacherBuild]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each teacher's feature targets with their shapes per image, by id: an online teacher's
    from a dry forward at its own input size (a ZeRO-3 teacher's shape twin runs on ``meta``),
    a replayed one's from its ``teacher_outputs.json`` (:func:`replayed_target_shapes`)."""
    shapes = {}
    for build in builds:
        if not feature_kinds(build.spec):
            continue
        if build.replayed:
            shapes[build.spec.id] = replayed_target_shapes(cfg, build.spec)
            continue
        targets = feature_targets_of(build, build.network)
        try:
            shapes[build.spec.id] = targets.shapes(network_preprocessing(cfg.data, build.spec, build.key).input_size)
        finally:
            targets.remove()
    return shapes


def replayed_target_shapes(cfg: ExperimentConfig, spec: TeacherSpec,
                           meta: dict | None = None) -> dict[str, tuple[int, ...]]:
    """A replayed teacher's feature targets (the kinds its entry's ``targets`` asks for) and
    their shapes per image, as its teacher-output store records them; a kind (or ``logits``)
    the store lacks is one line naming the entry and the fix."""
    from kdscale.data.teacher_outputs import read_meta

    asked = teacher_kinds(spec)
    if asked == ("logits",) and meta is None:
        return {}
    meta = meta if meta is not None else read_meta(spec.outputs)
    stored = {kind: tuple(shape) for kind, shape in meta.get("target_shapes", {}).items()}
    have = [kind for kind in meta.get("targets", ["logits"]) if kind != "logits" or meta.get("top_k", 1) > 0]
    missing = [kind for kind in asked if kind not in have or (kind != "logits" and kind not in stored)]
    if missing:
        key = teacher_key(cfg, spec)
        raise KdscaleError(f"{key}.targets={list(asked)}, but the teacher outputs in {spec.outputs} store "
                           f"{', '.join(have) or 'nothing'} (no {', '.join(missing)}); rewrite them with kdscale.teach "
                           f"and teacher.targets={list(asked)} into another teacher.outputs, or set {key}.targets="
                           f"{[kind for kind in asked if kind not in missing] or list(have)}")
    return {kind: stored[kind] for kind in asked if kind != "logits"}


def feature_network(cfg: ExperimentConfig, builds: list[TeacherBuild]) -> nn.Module | None:
    """The network a method may read (shapes, layer names): the feature teacher's, or the
    trained teacher; None when it is replayed."""
    wanted = feature_teacher_id(cfg)
    return next((b.network for b in builds if b.spec.id == wanted), None)


def frozen_teachers(cfg: ExperimentConfig, builds: list[TeacherBuild], needs: TeacherNeeds, method_name: str,
                    runtime: Runtime) -> dict[str, FrozenTeacher]:
    """Each online frozen teacher ready to run, by id; the feature teacher taps ``needs.features``.
    Refuses a teacher the method would run for nothing and features from a replayed teacher."""
    feature_id = feature_teacher_id(cfg)
    frozen = {}
    for build in builds:
        taps = list(needs.features) if build.spec.id == feature_id else []
        kinds = feature_kinds(build.spec)
        if taps and build.replayed:
            raise KdscaleError(f"method {method_name!r} needs features: use {build.key}.source=online (it reads the "
                               f"teacher's {', '.join(needs.features)}; {build.key}.source=shards replays stored "
                               f"logits and summary/spatial targets, no layers)")
        if kinds and not needs.targets:
            raise KdscaleError(f"{build.key}.targets={list(teacher_kinds(build.spec))}: method {method_name!r} reads "
                               f"no summary or spatial features (method features does); set {build.key}.targets="
                               f"[logits] or remove it")
        gives_logits = "logits" in teacher_kinds(build.spec)
        used = taps or (needs.logits and gives_logits) or (needs.targets and kinds)
        if not used and (len(builds) > 1 or needs.targets):
            what = f"the features of one teacher (method.feature_teacher={feature_id})" if needs.features else \
                "teachers' summary or spatial features" if not needs.logits else "teachers' logits"
            fix = f"set {build.key}.targets (summary, spatial)" if needs.targets else f"remove it from teachers"
            raise KdscaleError(f"method {method_name!r} reads only {what}; {build.key} ({build.spec.id}) would run for "
                               f"nothing: {fix}")
        if build.replayed:
            continue
        network = build.network
        if build.sharding == "zero3":
            network = build_partitioned(
                lambda spec=build.spec, classes=build.classes, key=build.key: build_model(
                    spec.name, classes, where=key, timm_options=spec.timm_options),
                build.weights, zero3_teacher_config(cfg.data.batch_size, runtime.autocast_dtype),
                where=f"{build.key}.weights={build.spec.weights}", device=runtime.device)
        targets = feature_targets_of(build, network, logits=needs.logits and gives_logits) \
            if needs.targets and kinds else None
        frozen[build.spec.id] = FrozenTeacher(network, taps, runtime.device, runtime.autocast_dtype,
                                              runtime.channels_last, sharding=build.sharding,
                                              micro_batch=cfg.data.batch_size,
                                              compile=compiles_teacher(cfg.train.compile), targets=targets)
    return frozen
