"""Capacity planner (``kdscale plan``): per-rank memory and per-step communication of a run,
for every strategy and frozen-teacher placement, before anything is launched.

Reference: the ZeRO paper's memory model (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", sec. 3.1): mixed-precision Adam
holds 2Ψ + 2Ψ + KΨ bytes for Ψ parameters (fp16 weights, fp16 gradients, K = 12 bytes of
fp32 master weights, momentum and variance); ZeRO-1 divides KΨ by the N ranks, ZeRO-2 also
the gradients, ZeRO-3 also the weights.

kdscale applies mixed precision itself (``train.precision: bf16`` is autocast; DeepSpeed's
``bf16.enabled`` stays false), so weights and gradients are fp32 under every precision. Per
rank, for Ψ trained parameter elements (a tied tensor once), S optimizer states per element
(SGD with momentum 1, without 0; AdamW 2) and P optimizer phases (``Distiller.phases``):

    strategy  weights     gradients  opt. state  fp32 master  buffers
    DDP       4Ψ          4Ψ         4SΨ         0            4Ψ (DDP's reducer buckets)
    ZeRO-1    4Ψ          4Ψ         4SΨ/N       4Ψ/N         4bR per phase (gradient buckets)
    ZeRO-2    4Ψ          4Ψ/N       4SΨ/N       4Ψ/N         4bR per phase
    ZeRO-3    4Ψ/N + 4G   4Ψ/N       4SΨ/N       0            4R per phase

plus the trained networks' BN buffers, replicated. With AdamW, ZeRO-1/2 thus hold the
paper's K = 4 + 8 = 12 bytes per element over N: DeepSpeed clones an fp32 master partition
even of fp32 weights (``stage_1_and_2.py``); ZeRO-3 updates fp32 weights in place. R is
``reduce_bucket_size`` (default 5e8 elements), b = 2 with ``overlap_comm`` else 1: a fixed
2-4 GiB per rank whatever the model. G is what ZeRO-3 keeps gathered: tensors of at most
``stage3_param_persistence_threshold`` elements (1e5) whole, the rest up to
``stage3_max_live_parameters`` (1e9; with the default reuse distance a network below ~5e8
parameters stays gathered from forward to backward, so this is an upper bound).
A frozen teacher (Ψ_T) holds 4Ψ_T replicated, or under ZeRO-3 4Ψ_T/N plus its persistent
tensors plus one forward's working set (largest module + ``stage3_prefetch_bucket_size``, 5e7).
Every online frozen teacher is counted, each under its placement; the teachers run one after
the other, so of several ZeRO-3 teachers only the largest working set is counted. A teacher
replayed from its output shards holds no parameters.

Rows vary the strategy and the frozen teachers' placement: a row's placement (``replicated``,
``zero3``) applies to every online teacher; when the config places its teachers differently
(``teachers[i].sharding``), the rows ``mixed`` place each as configured.

Activations are measured (:mod:`kdscale.planning.activations`): one forward+backward of the
real networks on CPU at two small batches, with every online teacher run, scaled linearly in
batch and ``image_size²`` (a network that accepts only its own input size, such as a timm ViT,
is probed at ``data.image_size``). Not counted: CUDA context, cuDNN workspace, fragmentation,
activation gradients in flight.

Communication per rank and optimizer step (ring collectives: factor (N-1)/N; fp32; A =
``train.grad_accum_steps``): DDP all-reduces the gradients once, 2Ψ·4 per phase; ZeRO-1
reduce-scatters them once and all-gathers the updated weights, 2Ψ·4; ZeRO-2 reduce-scatters
every micro-batch, (A+1)Ψ·4; ZeRO-3 all-gathers the weights in forward and backward and
reduce-scatters every micro-batch, 3AΨ·4 (the paper's 1.5x); each ZeRO-3 teacher all-gathers
its weights every micro-batch, AΨ_T·4. Time is volume / link speed.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from kdscale.config.schema import ExperimentConfig
from kdscale.errors import KdscaleError
from kdscale.planning.activations import ActivationEstimate, measure_activations, step_source
from kdscale.planning.features import FeaturePlan, feature_plan
from kdscale.planning.networks import build_networks, planned_precision, training_samples

GIB = 2**30
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for keys a DeepSpeed JSON leaves out.
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "contiguous_gradients": True, "stage3_param_persistence_threshold": 1e5,
                 "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}


@dataclasses.dataclass
class TeacherSizes:
    """One frozen teacher: its parameter elements (Ψ_T), those in tensors ZeRO-3 keeps whole,
    its largest module's, its buffer bytes and its configured placement; a replayed teacher
    (``sharding="shards"``) holds nothing."""

    id: str
    name: str
    parameters: int = 0
    persistent: int = 0
    largest_module: int = 0
    buffer_bytes: int = 0
    sharding: str = "replicated"

    @property
    def replayed(self) -> bool:
        return self.sharding == "shards"


@dataclasses.dataclass
class NetworkSizes:
    """Parameter elements (Ψ) and buffer bytes of the trained networks and the frozen teachers.

    ``teachers``: every frozen teacher, in config order. ``teacher*``: their totals (the
    largest module: the largest of any); given without ``teachers``, they describe one
    replicated teacher."""

    trained: int
    trained_persistent: int  # in tensors ZeRO-3 keeps whole (below the persistence threshold)
    trained_buffer_bytes: int
    phases: int
    teacher: int = 0
    teacher_persistent: int = 0
    teacher_largest_module: int = 0
    teacher_buffer_bytes: int = 0
    state_bytes_per_sample: int = 0  # per training sample, rows sharded across ranks (CRD's memory banks)
    dataset_size: int = 0
    teachers: list[TeacherSizes] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.teacher and not self.teachers:
            self.teachers = [TeacherSizes("teacher", "", self.teacher, self.teacher_persistent,
                                          self.teacher_largest_module, self.teacher_buffer_bytes)]
        elif self.teachers:
            self.teacher = sum(t.parameters for t in self.teachers)
            self.teacher_persistent = sum(t.persistent for t in self.teachers)
            self.teacher_largest_module = max(t.largest_module for t in self.teachers)
            self.teacher_buffer_bytes = sum(t.buffer_bytes for t in self.teachers)

    @property
    def online_teachers(self) -> list[TeacherSizes]:
        return [t for t in self.teachers if not t.replayed]

    def placements(self, gpus: int) -> tuple[str, ...]:
        """The rows' teacher placements: replicated (and zero3 on several GPUs) with an online
        teacher, plus ``mixed`` where the configured placements differ; else shards or none."""
        online = self.online_teachers
        if not online:
            return ("shards",) if self.teachers else ("none",)
        mixed = ("mixed",) if gpus > 1 and len({t.sharding for t in online}) > 1 else ()
        return ("replicated", "zero3")[:1 + (gpus > 1)] + mixed

    def rank_state_bytes(self, ranks: int) -> int:
        return self.state_bytes_per_sample * math.ceil(self.dataset_size / ranks)


@dataclasses.dataclass
class RankPlan:
    """Bytes one rank holds under one strategy, and its communication per optimizer step."""

    strategy: str
    teacher_sharding: str
    parameters: int  # the replica, or under ZeRO-3 this rank's partition
    gathered: int  # ZeRO-3: persistent tensors and the gathered working set
    gradients: int
    optimizer_states: int
    master_weights: int
    buffers: int
    teacher: int
    activations: int
    comm_bytes: int
    comm_seconds: float

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in ("parameters", "gathered", "gradients", "optimizer_states",
                                                    "master_weights", "buffers", "teacher", "activations"))


def optimizer_states_per_parameter(cfg: ExperimentConfig) -> int:
    return 2 if cfg.optim.name == "adamw" else int(cfg.optim.momentum > 0)  # exp_avg + exp_avg_sq; momentum_buffer


def zero_settings(cfg: ExperimentConfig, stage: int) -> dict:
    """The ZeRO settings of the DeepSpeed JSON the trainer would read (``distributed.deepspeed_config``
    or accelerate's; its stage ignored), else DeepSpeed's defaults."""
    from kdscale.engines.deepspeed_config import _config_path, _read_json

    path = _config_path(cfg)
    given = {k: v for k, v in (_read_json(path) if path else {}).get("zero_optimization", {}).items()
             if v not in (None, "auto")}
    return {**ZERO_DEFAULTS, **{k: given[k] for k in ZERO_DEFAULTS if k in given},
            "overlap_comm": bool(given.get("overlap_comm", stage == 3))}


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def teacher_sizes(tid: str, name: str, teacher: nn.Module, sharding: str) -> TeacherSizes:
    params = list(teacher.parameters())
    return TeacherSizes(tid, name, sum(p.numel() for p in params),
                        sum(p.numel() for p in params if p.numel() <= ZERO_DEFAULTS[
                            "stage3_param_persistence_threshold"]),  # the teacher's engine runs DeepSpeed's defaults
                        max(sum(p.numel() for p in m.parameters(recurse=False)) for m in teacher.modules()),
                        _buffer_bytes(teacher), sharding)


def frozen_teacher_sizes(cfg: ExperimentConfig, distiller: nn.Module, frozen: dict) -> list[TeacherSizes]:
    """Every frozen teacher of the run, in config order (networks built by hand without
    ``cfg.teachers``: those of ``frozen``), each with its configured placement."""
    if type(distiller).teacher_role != "frozen":
        return []
    specs = {spec.id: spec for spec in cfg.teachers}
    out = []
    for tid in list(specs) or list(frozen):
        spec = specs.get(tid)
        if tid in frozen:
            sharding = cfg.teacher_sharding(spec) if spec is not None else cfg.distributed.teacher_sharding
            out.append(teacher_sizes(tid, spec.name if spec is not None else "", frozen[tid].model, sharding))
        elif spec is not None and spec.source == "shards":
            out.append(TeacherSizes(tid, spec.name or "", sharding="shards"))
    return out


def network_sizes(distiller: nn.Module, teachers: list[TeacherSizes], persistence_threshold: float) -> NetworkSizes:
    trained = [p for p in distiller.parameters() if p.requires_grad]  # parameters() yields a tied tensor once
    return NetworkSizes(trained=sum(p.numel() for p in trained),
                        trained_persistent=sum(p.numel() for p in trained if p.numel() <= persistence_threshold),
                        trained_buffer_bytes=_buffer_bytes(distiller), phases=len(distiller.phases()),
                        teachers=teachers)


def teacher_bytes(placement: str, sizes: NetworkSizes, gpus: int, accum: int) -> tuple[int, int]:
    """Bytes per rank of the frozen teachers and the elements they all-gather per optimizer
    step, with every online teacher under ``placement`` (``mixed``: each under its own)."""
    held, live, gathered = sizes.teacher_buffer_bytes, 0, 0
    for teacher in sizes.online_teachers:
        sharding = teacher.sharding if placement == "mixed" else placement
        if sharding == "zero3":
            loose = teacher.parameters - teacher.persistent
            live = max(live, min(loose, teacher.largest_module + int(ZERO_DEFAULTS["stage3_prefetch_bucket_size"])))
            held += 4 * (math.ceil(teacher.parameters / gpus) + teacher.persistent)
            gathered += accum * teacher.parameters
        elif sharding == "replicated":
            held += 4 * teacher.parameters
    return held + 4 * live, gathered


def rank_plan(strategy: str, teacher_sharding: str, sizes: NetworkSizes, activations: int,
              cfg: ExperimentConfig, gpus: int, link_gbps: float) -> RankPlan:
    """The table of the module docstring for one strategy and frozen-teacher placement."""
    n, psi, states = gpus, sizes.trained, optimizer_states_per_parameter(cfg)
    part, ring, accum = math.ceil(psi / n), (n - 1) / n, cfg.train.grad_accum_steps
    if strategy == "ddp":
        row = {"parameters": 4 * psi, "gathered": 0, "gradients": 4 * psi, "optimizer_states": 4 * states * psi,
               "master_weights": 0, "buffers": 4 * psi}
        comm = 2 * psi * sizes.phases
    else:
        stage = int(strategy[-1])
        zero = zero_settings(cfg, stage)
        bucket = 4 * int(zero["reduce_bucket_size"]) * sizes.phases if zero["contiguous_gradients"] else 0
        row = {"parameters": 4 * (psi if stage < 3 else part), "gathered": 0,
               "gradients": 4 * (psi if stage == 1 else part), "optimizer_states": 4 * states * part,
               "master_weights": 4 * part if stage < 3 else 0,
               "buffers": bucket * (2 if zero["overlap_comm"] and stage < 3 else 1)}
        if stage == 3:
            loose = psi - sizes.trained_persistent
            row["gathered"] = 4 * (sizes.trained_persistent + min(loose, int(zero["stage3_max_live_parameters"])))
            comm = 3 * accum * psi
        else:
            comm = (2 if stage == 1 else accum + 1) * psi
    teacher, gathered = teacher_bytes(teacher_sharding, sizes, n, accum)
    comm += gathered
    comm_bytes = int(4 * comm * ring)
    row["parameters"] += sizes.trained_buffer_bytes
    row["buffers"] += sizes.rank_state_bytes(n)
    return RankPlan(strategy, teacher_sharding, **row, teacher=teacher, activations=activations,
                    comm_bytes=comm_bytes, comm_seconds=comm_bytes / (link_gbps * 1e9 / 8))


@dataclasses.dataclass
class Plan:
    rows: list[RankPlan]
    sizes: NetworkSizes
    activation: ActivationEstimate
    precision: str
    gpus: int
    gpu_memory_gib: float
    link_gbps: float
    features: FeaturePlan | None = None  # method features: adaptor heads, stored feature targets

    def fits(self, row: RankPlan) -> bool:
        return row.total <= self.gpu_memory_gib * GIB


def plan_networks(distiller, frozen, cfg: ExperimentConfig, gpus: int, gpu_memory_gib: float = 80.0,
                  link_gbps: float = 100.0, autocast_dtype=None) -> Plan:
    """Plan built networks on ``gpus`` ranks. ``frozen``: the online frozen teachers by id
    (:func:`kdscale.train.setup.build_distiller`'s), one :class:`FrozenTeacher`, or None."""
    if frozen is None or not isinstance(frozen, dict):
        frozen = {} if frozen is None else {"teacher": frozen}
    threshold = zero_settings(cfg, 3)["stage3_param_persistence_threshold"]
    sizes = network_sizes(distiller, frozen_teacher_sizes(cfg, distiller, frozen), threshold)
    sizes.state_bytes_per_sample = distiller.state_bytes_per_sample()
    sizes.dataset_size = training_samples(cfg) if sizes.state_bytes_per_sample else 0
    estimate = measure_activations(distiller, step_source(cfg, frozen, distiller), cfg, autocast_dtype)
    activations = estimate.at(cfg.data.batch_size, cfg.data.image_size)
    rows = [rank_plan(s, t, sizes, activations, cfg, gpus, link_gbps) for s in ("ddp", "zero1", "zero2", "zero3")
            for t in sizes.placements(gpus)]
    return Plan(rows, sizes, estimate, planned_precision(cfg), gpus, gpu_memory_gib, link_gbps,
                feature_plan(cfg, distiller, frozen))


def plan_config(cfg: ExperimentConfig, gpus: int, gpu_memory_gib: float = 80.0, link_gbps: float = 100.0) -> Plan:
    check_plan_arguments(gpus, gpu_memory_gib, link_gbps)
    distiller, frozen, autocast_dtype = build_networks(cfg)
    return plan_networks(distiller, frozen, cfg, gpus, gpu_memory_gib, link_gbps, autocast_dtype)


def check_plan_arguments(gpus: int, gpu_memory_gib: float, link_gbps: float) -> None:
    if gpus < 1:
        raise KdscaleError(f"--gpus must be at least 1, got {gpus}")
    if not gpu_memory_gib > 0:
        raise KdscaleError(f"--gpu-memory must be a positive number of GiB per GPU, got {gpu_memory_gib}")
    if not link_gbps > 0:
        raise KdscaleError(f"--link-gbps must be a positive link speed in Gbit/s, got {link_gbps}")
