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

Activations are measured: one forward+backward of the real networks on CPU at two small
batches under the config's autocast, summing the distinct storages saved for backward
(``saved_tensors_hooks``; weights excluded, their bf16 casts included) and the teacher's
outputs, scaled linearly in batch and ``image_size²``. Not counted: CUDA context, cuDNN
workspace, fragmentation, activation gradients in flight.

Communication per rank and optimizer step (ring collectives: factor (N-1)/N; fp32; A =
``train.grad_accum_steps``): DDP all-reduces the gradients once, 2Ψ·4 per phase; ZeRO-1
reduce-scatters them once and all-gathers the updated weights, 2Ψ·4; ZeRO-2 reduce-scatters
every micro-batch, (A+1)Ψ·4; ZeRO-3 all-gathers the weights in forward and backward and
reduce-scatters every micro-batch, 3AΨ·4 (the paper's 1.5x); a ZeRO-3 teacher all-gathers
its weights every micro-batch, AΨ_T·4. Time is volume / link speed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from kdscale.config.schema import ExperimentConfig
from kdscale.errors import KdscaleError
from kdscale.runtime.device import autocast as run_autocast

GIB = 2**30
PROBE_BATCHES = (2, 4)
PROBE_SIDE = 128  # activations are measured at min(image_size, 128) px and scaled by area
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for keys a DeepSpeed JSON leaves out.
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "contiguous_gradients": True, "stage3_param_persistence_threshold": 1e5,
                 "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}


@dataclasses.dataclass
class NetworkSizes:
    """Parameter elements (Ψ) and buffer bytes of the trained networks and the frozen teacher."""

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

    def rank_state_bytes(self, ranks: int) -> int:
        return self.state_bytes_per_sample * math.ceil(self.dataset_size / ranks)


@dataclasses.dataclass
class ActivationEstimate:
    """``constant + per_sample * batch * (side / probe_side)²`` bytes."""

    constant: int
    per_sample: int
    probe_side: int

    def at(self, batch: int, side: int) -> int:
        return int(self.constant + self.per_sample * batch * (side / self.probe_side) ** 2)


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


def planned_precision(cfg: ExperimentConfig) -> str:
    return "fp32" if cfg.train.precision in ("fp32", "tf32") else "bf16"  # auto: bf16 on a GPU


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


def network_sizes(distiller: nn.Module, teacher: nn.Module | None, persistence_threshold: float) -> NetworkSizes:
    trained = [p for p in distiller.parameters() if p.requires_grad]  # parameters() yields a tied tensor once
    sizes = NetworkSizes(trained=sum(p.numel() for p in trained),
                         trained_persistent=sum(p.numel() for p in trained if p.numel() <= persistence_threshold),
                         trained_buffer_bytes=_buffer_bytes(distiller), phases=len(distiller.phases()))
    if teacher is not None:
        params = list(teacher.parameters())
        sizes.teacher = sum(p.numel() for p in params)
        sizes.teacher_persistent = sum(p.numel() for p in params if p.numel() <= ZERO_DEFAULTS[
            "stage3_param_persistence_threshold"])  # the teacher's engine runs DeepSpeed's defaults
        sizes.teacher_largest_module = max(sum(p.numel() for p in m.parameters(recurse=False))
                                           for m in teacher.modules())
        sizes.teacher_buffer_bytes = _buffer_bytes(teacher)
    return sizes


def _storage(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _saved_in_phase(distiller, phase: str, inputs: tuple, kept: list, autocast) -> int:
    """Bytes of the distinct storages one phase's forward saves for its backward, weights
    excluded, plus those of ``kept`` (the teacher's outputs, alive through the step)."""
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


def saved_bytes(distiller, frozen, cfg: ExperimentConfig, batch: int, side: int, autocast_dtype) -> int:
    """Activation bytes of one training step at ``batch`` x ``side``px: the largest phase."""
    from kdscale.methods import TeacherOutput

    images = torch.randn(batch, 3, side, side)
    targets = torch.randint(0, cfg.data.num_classes, (batch,))
    if frozen is not None:
        teacher_output = frozen(images)
    elif type(distiller).teacher_role == "frozen":  # replayed soft labels (teacher.source=shards)
        teacher_output = TeacherOutput(torch.randn(batch, cfg.data.num_classes).log_softmax(-1))
    else:
        teacher_output = None
    outputs = [teacher_output.logits, *teacher_output.features.values()] if teacher_output is not None else []
    autocast = run_autocast("cpu", autocast_dtype)
    return max(_saved_in_phase(distiller, phase, (images, targets, teacher_output), outputs, autocast)
               for phase in distiller.phases())


def measure_activations(distiller, frozen, cfg: ExperimentConfig, autocast_dtype) -> ActivationEstimate:
    side = min(cfg.data.image_size, PROBE_SIDE)
    small, large = (saved_bytes(distiller, frozen, cfg, b, side, autocast_dtype) for b in PROBE_BATCHES)
    per_sample = max(0, (large - small) // (PROBE_BATCHES[1] - PROBE_BATCHES[0]))
    return ActivationEstimate(max(0, small - per_sample * PROBE_BATCHES[0]), per_sample, side)


def build_networks(cfg: ExperimentConfig):
    """The Distiller and frozen teacher as the trainer builds them (on CPU; random weights, same sizes)."""
    from kdscale.runtime.device import Runtime
    from kdscale.train.setup import build_distiller

    spec = dataclasses.replace
    cfg = spec(cfg, student=spec(cfg.student, weights=None),
               teacher=spec(cfg.teacher, weights=None) if cfg.teacher is not None else None,
               distributed=spec(cfg.distributed, teacher_sharding="replicated"))
    autocast_dtype = torch.bfloat16 if planned_precision(cfg) == "bf16" else None
    torch.manual_seed(cfg.experiment.seed)
    with warnings.catch_warnings():  # "teacher.weights is not set": dropped on purpose
        warnings.simplefilter("ignore")
        labels = torch.arange(PROBE_BATCHES[-1]) % cfg.data.num_classes  # per-sample state (CRD) at probe size
        distiller, frozen = build_distiller(cfg, Runtime(torch.device("cpu"), autocast_dtype, False), world_size=1,
                                            train_labels=labels)
    return distiller.train(), frozen, autocast_dtype


def rank_plan(strategy: str, teacher_sharding: str, sizes: NetworkSizes, activations: int,
              cfg: ExperimentConfig, gpus: int, link_gbps: float) -> RankPlan:
    """The table of the module docstring for one strategy and teacher placement."""
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
    teacher = sizes.teacher_buffer_bytes
    if teacher_sharding == "zero3":
        loose = sizes.teacher - sizes.teacher_persistent
        live = min(loose, sizes.teacher_largest_module + int(ZERO_DEFAULTS["stage3_prefetch_bucket_size"]))
        teacher += 4 * (math.ceil(sizes.teacher / n) + sizes.teacher_persistent + live)
        comm += accum * sizes.teacher
    elif teacher_sharding == "replicated":
        teacher += 4 * sizes.teacher
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

    def fits(self, row: RankPlan) -> bool:
        return row.total <= self.gpu_memory_gib * GIB


def plan_networks(distiller, frozen, cfg: ExperimentConfig, gpus: int, gpu_memory_gib: float = 80.0,
                  link_gbps: float = 100.0, autocast_dtype=None) -> Plan:
    """Plan built networks (``frozen``: a :class:`FrozenTeacher` or None) on ``gpus`` ranks."""
    threshold = zero_settings(cfg, 3)["stage3_param_persistence_threshold"]
    sizes = network_sizes(distiller, frozen.model if frozen is not None else None, threshold)
    sizes.state_bytes_per_sample = distiller.state_bytes_per_sample()
    sizes.dataset_size = training_samples(cfg) if sizes.state_bytes_per_sample else 0
    estimate = measure_activations(distiller, frozen, cfg, autocast_dtype)
    activations = estimate.at(cfg.data.batch_size, cfg.data.image_size)
    placements = (("replicated", "zero3")[:1 + (gpus > 1)] if frozen is not None else
                  ("shards",) if cfg.teacher is not None and cfg.teacher.source == "shards" else ("none",))
    rows = [rank_plan(s, t, sizes, activations, cfg, gpus, link_gbps) for s in ("ddp", "zero1", "zero2", "zero3")
            for t in placements]
    return Plan(rows, sizes, estimate, planned_precision(cfg), gpus, gpu_memory_gib, link_gbps)


def plan_config(cfg: ExperimentConfig, gpus: int, gpu_memory_gib: float = 80.0, link_gbps: float = 100.0) -> Plan:
    check_plan_arguments(gpus, gpu_memory_gib, link_gbps)
    distiller, frozen, autocast_dtype = build_networks(cfg)
    return plan_networks(distiller, frozen, cfg, gpus, gpu_memory_gib, link_gbps, autocast_dtype)


def training_samples(cfg: ExperimentConfig) -> int:
    """``data.train_samples``, else the count in the shards' ``index.json``."""
    from kdscale.data.shards import expand_shards, samples_from_index

    if cfg.data.train_samples:
        return cfg.data.train_samples
    count = samples_from_index(expand_shards(cfg.data.train_shards, "data.train_shards"), "train")
    if not count:
        raise KdscaleError(f"method {cfg.method.name!r} keeps state per training sample: set data.train_samples")
    return count


def check_plan_arguments(gpus: int, gpu_memory_gib: float, link_gbps: float) -> None:
    if gpus < 1:
        raise KdscaleError(f"--gpus must be at least 1, got {gpus}")
    if not gpu_memory_gib > 0:
        raise KdscaleError(f"--gpu-memory must be a positive number of GiB per GPU, got {gpu_memory_gib}")
    if not link_gbps > 0:
        raise KdscaleError(f"--link-gbps must be a positive link speed in Gbit/s, got {link_gbps}")
