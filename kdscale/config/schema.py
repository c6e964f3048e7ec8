"""The typed schema of an experiment config.

A config is YAML with these sections; every key has a type and a default, and the loader
(:mod:`kdscale.config.loader`) rejects unknown or mistyped keys before anything starts.
The ``method`` section holds ``name`` plus the parameters of that method, which are typed
by the method's own ``Params`` dataclass (see :mod:`kdscale.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from kdscale.config.ranges import ranged


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
    """``torchvision:<model>``, ``timm:<model>[.<tag>]`` or a CIFAR net name (``resnet8x4``,
    ``wrn_40_2``, ...)."""
    weights: Optional[str] = None
    """None (random init), ``torchvision:DEFAULT`` / ``torchvision:<ENUM>``, ``timm:DEFAULT`` /
    ``timm:<pretrained tag>``, or a file: a kdscale checkpoint (``path.pt`` or
    ``path.pt#<network>``), a state_dict ``.pt``/``.pth``/``.bin`` or a ``.safetensors`` file."""
    num_classes: Optional[int] = ranged(None, "the number of classes the network predicts", ge=1)
    """Defaults to ``data.num_classes``."""
    timm_options: Optional[dict[str, Any]] = None
    """Keyword arguments for ``timm.create_model`` (``timm:`` models only), e.g.
    ``{img_size: 96}`` for a ViT built at another resolution."""


@dataclass
class TeacherSpec(ModelSpec):
    id: Optional[str] = None
    """The teacher's name in metrics (``val/<id>_top1``), loss terms and ``method.feature_teacher``,
    independent of its architecture: letters, digits, ``_`` and ``-``. Default: ``teacher`` for
    a run's only teacher, ``teacher<i>`` for entry i of a ``teachers`` list."""
    weight: float = ranged(1.0, "the teacher's weight in the ensemble", gt=0)
    """Its weight in an ensemble of frozen teachers; weights are normalised to sum to 1
    (:mod:`kdscale.methods.ensemble`)."""
    sharding: Optional[Literal["replicated", "zero3"]] = None
    """A frozen teacher's placement; default ``distributed.teacher_sharding``."""
    source: Literal["online", "shards"] = "online"
    """Where a frozen teacher's outputs come from: ``online`` runs it every step; ``shards``
    replays crops and what ``kdscale.teach`` stored of them in ``teacher.outputs`` (no teacher
    runs): soft labels, and feature targets for ``targets`` beside ``logits``; for methods that
    read no teacher layers."""
    outputs: Optional[str] = None
    """Directory of teacher-output shards: written by ``kdscale.teach``, read when
    ``source: shards``."""
    crops_per_image: int = ranged(10, "crops stored per image", ge=1)
    """Crops stored per image by ``kdscale.teach`` (R)."""
    top_k: int = ranged(10, "probabilities stored per crop", ge=1)
    """Probabilities stored per crop by ``kdscale.teach``."""
    mean: Optional[list[float]] = None
    """A frozen teacher's per-channel mean (its view: :mod:`kdscale.teachers.views`); default:
    its pretrained weights' (timm ``pretrained_cfg``, torchvision transforms), else ``data.mean``."""
    std: Optional[list[float]] = field(default=None, metadata={"gt": 0, "what": "the teacher's per-channel std"})
    """A frozen teacher's per-channel std; default as for ``mean``."""
    input_size: Optional[int] = ranged(None, "the side of the frozen teacher's input, in pixels", ge=1)
    """A frozen teacher's input side: the student's crop is resized to it on the device;
    default: its pretrained weights' input size, else ``data.image_size``."""
    targets: Optional[list[Literal["logits", "summary", "spatial"]]] = None
    """What a frozen teacher teaches: its ``logits`` (default, every method), and for the
    ``features`` method its ``summary`` feature (CLS token or pooled features) and ``spatial``
    map (patch tokens on their grid, or a CNN's last map; :mod:`kdscale.models.feature_targets`).
    A teacher without ``logits`` needs no matching ``num_classes``."""
    summary_layer: Optional[str] = None
    """Module whose *input* is the summary feature (default: timm's ``forward_head(pre_logits)``,
    else the last ``nn.Linear``)."""
    spatial_layer: Optional[str] = None
    """Module whose *output* is the spatial map (default: timm's ``forward_features``, else the
    input of ``avgpool``)."""


@dataclass
class DataSection:
    train_shards: str = ""
    """Brace pattern or glob of training tar shards, e.g. ``data/train-{000000..000099}.tar``."""
    val_shards: str = ""
    num_classes: int = ranged(10, "the number of classes", ge=1)
    labels: Literal["required", "none"] = "required"
    """``required``: every training sample carries a class label (``.cls``); one without is a
    bad sample. ``none``: training samples without ``.cls`` are valid (target -1; those with
    one keep it), for methods whose terms all work without labels (unlabelled shards:
    ``from-folder --unlabelled``, ``from-hf`` without a label column). Validation shards
    always need labels. Refused with a method that needs labels, and with Mixup/CutMix."""
    knn_memory_shards: Optional[str] = None
    """Labelled shards whose summary features are the k-NN memory of validation (DINO's
    protocol, :mod:`kdscale.train.knn`); default: the training shards when they are labelled."""
    knn_memory_samples: int = ranged(10000, "samples of the k-NN memory", ge=1)
    """The first this many samples of ``knn_memory_shards`` (centre crops) form the memory."""
    train_samples: Optional[int] = ranged(None, "samples per epoch; null reads index.json", ge=1)
    """Samples per epoch; defaults to the count in ``index.json`` beside the shards."""
    image_size: int = ranged(32, "the side of the square input images, in pixels", ge=1)
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    """``cifar``: pad 4 + random crop + flip. ``imagenet``: random-resized crop + flip."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Training images: ``cpu`` decodes and augments in the loader workers; ``gpu`` ships the
    JPEG bytes with their crop box and flip, and the rank decodes the batch on its device
    (:mod:`kdscale.data.device_decode`; ``imagenet`` augmentation, online or no teacher)."""
    jpeg_draft: bool = True
    """``imagenet`` augmentation: let libjpeg decode a crop that is at least twice the output
    size at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling, as FFCV does) before the resize.
    The crop boxes are the same; pixels differ by a few levels (docs/data.md)."""
    val_resize: Optional[int] = ranged(None, "the shorter side before the validation centre crop", ge=1)
    """Shorter side before the centre crop in validation; default image_size (cifar) or
    image_size * 8/7 (imagenet)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225],
                             metadata={"gt": 0, "what": "per-channel standard deviations the inputs are divided by"})
    batch_size: int = ranged(64, "the per-process batch size", ge=1)
    """Per process (per GPU). The global batch is batch_size x processes x grad_accum_steps."""
    num_workers: int = ranged(2, "loader worker processes per rank; 0 loads in the training process", ge=0)
    shuffle_buffer: int = ranged(1000, "samples held in the shuffle buffer", ge=1)
    mixup_alpha: float = ranged(0.0, "Mixup's Beta(alpha, alpha); 0 disables", ge=0)
    """Mixup Beta(alpha, alpha); 0 disables. Targets become soft; the teacher sees the mixed view."""
    cutmix_alpha: float = ranged(0.0, "CutMix's Beta(alpha, alpha); 0 disables", ge=0)
    """CutMix Beta(alpha, alpha); 0 disables."""
    mix_prob: float = ranged(1.0, "the probability that a batch is mixed", ge=0, le=1)
    """Probability that a batch is mixed at all."""
    mix_switch_prob: float = ranged(0.5, "the probability of CutMix instead of Mixup", ge=0, le=1)
    """With both enabled: probability of CutMix instead of Mixup for a batch."""
    max_bad_samples: int = ranged(100, "bad samples a worker may skip; 0 stops at the first", ge=0)
    """Corrupt, unlabelled or unreadable samples one loader worker may skip (each named in a
    warning) before the run stops with an error."""
    loader_timeout_s: float = ranged(600.0, "seconds a loader worker may go without a batch", gt=0)
    """A loader worker that delivers no batch for this long is an error naming the worker."""


@dataclass
class OptimSection:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = ranged(0.1, "the peak learning rate", gt=0)
    momentum: float = ranged(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = ranged(5e-4, "0 turns weight decay off", ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999],
                               metadata={"ge": 0, "lt": 1, "what": "AdamW's moment decay rates"})
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[float] = field(default_factory=list,
                                    metadata={"ge": 0, "what": "epochs at which lr is multiplied by gamma"})
    """Epochs (fractions allowed) at which the multistep schedule multiplies lr by gamma."""
    gamma: float = ranged(0.1, "the multistep schedule's lr factor", gt=0)
    warmup_epochs: float = ranged(0.0, "epochs of linear warm-up; 0 disables", ge=0)
    """Linear warm-up from 0 to lr over this many epochs."""
    min_lr: float = ranged(0.0, "the floor of the cosine schedule", ge=0)
    """Floor of the cosine schedule."""


@dataclass
class TrainSection:
    epochs: int = ranged(1, "training epochs", ge=1)
    grad_accum_steps: int = ranged(1, "micro-batches per optimizer step; 1 does not accumulate", ge=1)
    clip_grad_norm: Optional[float] = ranged(None, "the gradient-norm limit; null does not clip", gt=0)
    label_smoothing: float = ranged(0.0, "0 turns label smoothing off", ge=0, lt=1)
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU. ``fp32``: no autocast and no TF32 (IEEE
    fp32 throughout, as the CIFAR papers trained); ``tf32``: no autocast, TF32 matmuls and
    convolutions on GPU (fp32 on CPU)."""
    deterministic: bool = False
    """On GPU: ``false`` lets cuDNN benchmark and pick its fastest algorithms (fast, not bit-
    reproducible); ``true`` uses deterministic algorithms only (``torch.use_deterministic_algorithms``,
    cuBLAS workspace ``:4096:8``; slower, and an op without a deterministic kernel fails with
    its name). A bit-identical resume on GPU needs ``true``. No effect on CPU."""
    channels_last: Optional[bool] = None
    """None: channels-last on GPU only."""
    compile: Literal["none", "networks", "teacher", "all"] = "none"
    """``torch.compile`` the networks the method trains (``networks``), the frozen teacher
    (``teacher``), or both (``all``): each network in place, never the DDP/DeepSpeed wrapper
    or the whole method (:mod:`kdscale.runtime.compile`). Refused with ZeRO-3 for what it
    partitions (``networks``/``all`` with ``distributed.strategy=zero3``, ``teacher``/``all``
    with ``distributed.teacher_sharding=zero3``): DeepSpeed gathers those parameters in module
    hooks that torch.compile cannot trace."""
    knn_eval: Literal["auto", "always", "never"] = "auto"
    """k-NN top-1 of summary features in validation (``val/student_knn_top1``,
    ``val/<id>_knn_top1``): ``auto`` for methods that distil features, ``always`` for any method, ``never``."""
    log_every_steps: int = ranged(20, "optimizer steps between log lines", ge=1)
    eval_every_epochs: int = ranged(1, "epochs between validations", ge=1)
    checkpoint_every_steps: int = ranged(0, "optimizer steps between checkpoints; 0: at each epoch's end only", ge=0)
    """0: checkpoint at the end of every epoch only."""
    keep_checkpoints: int = ranged(2, "checkpoints kept in the run directory", ge=1)
    stop_after_steps: Optional[int] = ranged(None, "null trains to the end of the schedule", ge=1)
    """Stop (with a checkpoint) after this many optimizer steps without changing the
    schedule, as a preempted job would; resume continues from there."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory if there is one."""
    preempt_file: Optional[str] = None
    """When this file appears (the Slurm scripts create it on the preemption signal), every
    rank stops at the same step with a checkpoint; default: ``$KDSCALE_PREEMPT_FILE``."""
    preempt_check_steps: int = ranged(5, "optimizer steps between looks for the preemption file", ge=1)
    """How often (optimizer steps) rank 0 looks for ``preempt_file`` and tells the others."""
    stall_timeout_s: float = ranged(900.0, "seconds a rank may go without progress", gt=0)
    """No optimizer step, validation or checkpoint on a rank for this long: the rank dumps
    every thread's stack, says what it waited for, and exits non-zero."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss: ``stop`` ends the run with an error naming the step and each term
    (the last good checkpoint is kept, nothing is exported; the ranks' answer is read one
    micro-step late so the host never waits for the GPU, and before anything is written);
    ``skip`` skips the step and counts it (the answer is read at once: the host waits for each
    forward)."""
    max_nonfinite_skips: int = ranged(10, "non-finite steps in a row before the run stops", ge=1)
    """With nonfinite=skip: stop after this many non-finite steps in a row."""


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
    timeout_s: int = ranged(1800, "the collective timeout in seconds", ge=1)
    """Collective timeout: a rank that stops answering ends the job after this long."""


@dataclass
class WandbSection:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """``auto``: online when an API key is configured, else offline."""
    project: str = "kdscale"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = ranged(60.0, "seconds wandb may take to start", gt=0)
    """How long an online start may take before kdscale falls back to offline logging."""


@dataclass
class MethodSection:
    name: str = "vanilla"
    feature_teacher: Optional[str] = None
    """With several frozen teachers: the ``id`` of the one whose layers a feature method taps
    (default: the first entry of ``teachers``)."""
    params: Any = None
    """The method's own ``Params`` dataclass instance, filled by the loader from the other
    keys of the ``method`` section."""


@dataclass
class ExperimentConfig:
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    method: MethodSection = field(default_factory=MethodSection)
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: Optional[TeacherSpec] = None
    """One teacher (input only): the loader turns it into a ``teachers`` list of one, so after
    loading it is always None and ``teachers`` says everything."""
    teachers: list[TeacherSpec] = field(default_factory=list)
    """The run's teachers: any number of frozen ones (each with its own view, placement and
    source), or the one teacher a method trains (ProKT, FFCL)."""
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    wandb: WandbSection = field(default_factory=WandbSection)

    def teacher_sharding(self, spec: TeacherSpec) -> str:
        """Where the frozen teacher ``spec`` runs: its own ``sharding``, else the run's."""
        return spec.sharding or self.distributed.teacher_sharding

    def only_teacher(self, what: str) -> Optional[TeacherSpec]:
        """The run's one teacher (None without any); ``what`` (e.g. ``kdscale.teach``) takes
        one, so several are an error naming the fix."""
        if len(self.teachers) > 1:
            from kdscale.errors import KdscaleError

            ids = ", ".join(t.id or "?" for t in self.teachers)
            raise KdscaleError(f"{what} takes one teacher, but teachers lists {len(self.teachers)} ({ids}); "
                               f"keep one entry (or set teacher: instead of teachers:)")
        return self.teachers[0] if self.teachers else None

    @property
    def run_dir(self) -> str:
        import os

        return os.path.join(self.experiment.output_dir, self.experiment.name)
