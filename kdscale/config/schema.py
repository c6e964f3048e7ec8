"""The typed schema of an experiment config.

A config is YAML with these sections; every key has a type and a default, and the loader
(:mod:`kdscale.config.loader`) rejects unknown or mistyped keys before anything starts.
The ``method`` section holds ``name`` plus the parameters of that method, which are typed
by the method's own ``Params`` dataclass (see :mod:`kdscale.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class ExperimentSection:
    name: str = "experiment"
    """Run name: the run directory is ``output_dir/name`` and the wandb group."""
    output_dir: str = "runs"
    dataset: str = "synthetic"
    """Dataset label used in wandb tags."""
    seed: int = 0


@dataclass
class ModelSpec:
    name: str = ""
    """``torchvision:<model>`` or a CIFAR net name (``resnet8x4``, ``wrn_40_2``, ...)."""
    weights: Optional[str] = None
    """None (random init), ``torchvision:DEFAULT`` / ``torchvision:<ENUM>``, or a file:
    a kdscale checkpoint (``path.pt`` or ``path.pt#<network>``), a state_dict ``.pt``
    or a ``.safetensors`` file."""
    num_classes: Optional[int] = None
    """Defaults to ``data.num_classes``."""


@dataclass
class TeacherSpec(ModelSpec):
    source: Literal["online", "shards"] = "online"
    """Where a frozen teacher's outputs come from: ``online`` runs it every step; ``shards``
    replays crops and soft labels stored by ``kdscale.teach`` in ``teacher.outputs`` (no
    teacher runs; for methods that need only the teacher's logits)."""
    outputs: Optional[str] = None
    """Directory of teacher-output shards: written by ``kdscale.teach``, read when
    ``source: shards``."""
    crops_per_image: int = 10
    """Crops stored per image by ``kdscale.teach`` (R)."""
    top_k: int = 10
    """Probabilities stored per crop by ``kdscale.teach``."""


@dataclass
class DataSection:
    train_shards: str = ""
    """Brace pattern or glob of training tar shards, e.g. ``data/train-{000000..000099}.tar``."""
    val_shards: str = ""
    num_classes: int = 10
    train_samples: Optional[int] = None
    """Samples per epoch; defaults to the count in ``index.json`` beside the shards."""
    image_size: int = 32
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    """``cifar``: pad 4 + random crop + flip. ``imagenet``: random-resized crop + flip."""
    val_resize: Optional[int] = None
    """Shorter side before the centre crop in validation; default image_size (cifar) or
    image_size * 8/7 (imagenet)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = 64
    """Per process (per GPU). The global batch is batch_size x processes x grad_accum_steps."""
    num_workers: int = 2
    shuffle_buffer: int = 1000
    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha); 0 disables. Targets become soft; the teacher sees the mixed view."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha); 0 disables."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all."""
    mix_switch_prob: float = 0.5
    """With both enabled: probability of CutMix instead of Mixup for a batch."""
    max_bad_samples: int = 100
    """Corrupt, unlabelled or unreadable samples one loader worker may skip (each named in a
    warning) before the run stops with an error."""


@dataclass
class OptimSection:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[float] = field(default_factory=list)
    """Epochs (fractions allowed) at which the multistep schedule multiplies lr by gamma."""
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 to lr over this many epochs."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""


@dataclass
class TrainSection:
    epochs: int = 1
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None
    label_smoothing: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU."""
    channels_last: Optional[bool] = None
    """None: channels-last on GPU only."""
    log_every_steps: int = 20
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    """0: checkpoint at the end of every epoch only."""
    keep_checkpoints: int = 2
    stop_after_steps: Optional[int] = None
    """Stop (with a checkpoint) after this many optimizer steps without changing the
    schedule, as a preempted job would; resume continues from there."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory if there is one."""
    preempt_file: Optional[str] = None
    """When this file appears (the Slurm scripts create it on the preemption signal), every
    rank stops at the same step with a checkpoint; default: ``$KDSCALE_PREEMPT_FILE``."""
    preempt_check_steps: int = 5
    """How often (optimizer steps) rank 0 looks for ``preempt_file`` and tells the others."""


@dataclass
class DistributedSection:
    strategy: Literal["auto", "ddp", "zero1", "zero2", "zero3"] = "auto"
    """How the trainable networks are replicated or sharded. ``auto``: DeepSpeed ZeRO when
    launched with ``accelerate launch --use_deepspeed`` (stage from ``--zero_stage``),
    else DDP."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON to start from (default: accelerate's ``--deepspeed_config_file``, else
    ``configs/deepspeed/zero<N>.json`` settings). kdscale fills batch sizes, stage and
    clipping from this config and rejects conflicting values."""
    teacher_sharding: Literal["replicated", "zero3"] = "replicated"
    """``replicated``: every rank runs a full frozen-teacher replica on its micro-batch.
    ``zero3``: the frozen teacher's parameters are partitioned across ranks (teachers too
    big for one device); every rank then runs the same forward calls."""
    timeout_s: int = 1800
    """Collective timeout: a rank that stops answering ends the job after this long."""


@dataclass
class WandbSection:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """``auto``: online when an API key is configured, else offline."""
    project: str = "kdscale"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 60.0
    """How long an online start may take before kdscale falls back to offline logging."""


@dataclass
class MethodSection:
    name: str = "vanilla"
    params: Any = None
    """The method's own ``Params`` dataclass instance, filled by the loader from the other
    keys of the ``method`` section."""


@dataclass
class ExperimentConfig:
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    method: MethodSection = field(default_factory=MethodSection)
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: Optional[TeacherSpec] = None
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    wandb: WandbSection = field(default_factory=WandbSection)

    @property
    def run_dir(self) -> str:
        import os

        return os.path.join(self.experiment.output_dir, self.experiment.name)
