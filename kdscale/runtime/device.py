"""Device-dependent choices of a run (precision, memory format), resolved once."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch

from kdscale.config.schema import ExperimentConfig


def set_tf32(allowed: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (Ampere and later), process-wide.

    ``train.precision: fp32`` turns both off: IEEE fp32 as the CIFAR papers' numbers were
    trained (PyTorch's own defaults would leave cuDNN convolutions on TF32). ``tf32`` turns
    both on: fp32 weights and activations, 10-bit-mantissa products with fp32 accumulation.
    ``auto`` and ``bf16`` allow TF32 too, for what runs outside autocast."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def autocast_section(autocast_dtype) -> dict:
    """DeepSpeed's ``torch_autocast`` section for kdscale's autocast dtype (None: off).

    DeepSpeed's engine forward runs the model under ``torch.autocast(enabled=False)`` when
    autocast is on outside it and its config has no such section (its check,
    ``torch.is_autocast_enabled()`` without a device, sees CUDA autocast only, so a CPU run
    never shows it): without it the ZeRO students and the ZeRO-3 frozen teacher would run in
    fp32 on GPUs. ``lower_precision_safe_modules: []`` tags no parameter with a bf16
    communication dtype: gradients are reduced in fp32, as under DDP."""
    if autocast_dtype is None:
        return {"enabled": False}
    return {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch."), "lower_precision_safe_modules": []}


def set_determinism(deterministic: bool) -> None:
    """``train.deterministic`` on a GPU, process-wide (see the schema)."""
    import os

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def auto_uses_bf16(precision: str, on_gpu: bool, native_bf16: bool, device=None) -> bool:
    """``bf16``: always (as asked). ``auto``: bf16 on a GPU that computes it natively (Ampere and
    later); on an older GPU (V100, T4: bf16 emulated, slow) fp32, said in one line."""
    if precision == "bf16":
        return True
    if precision != "auto" or not on_gpu:
        return False
    if not native_bf16:
        from kdscale.log import log

        log.info(f"train.precision=auto: {device} has no native bf16; training in fp32 (TF32 where the GPU has it). "
                 f"train.precision=bf16 forces emulated bf16")
    return native_bf16


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """The run's autocast context on ``device`` (``dtype`` None: none, fp32): the one place it is
    built, for the trainer, the frozen teachers, evaluation, the benchmark and the planner."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclasses.dataclass
class Runtime:
    """Device-dependent choices, resolved once."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self):
        """The run's autocast context (see :func:`autocast`)."""
        return autocast(self.device, self.autocast_dtype)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, device: torch.device) -> "Runtime":
        on_gpu = device.type == "cuda"
        precision = cfg.train.precision
        if on_gpu:
            set_tf32(precision != "fp32")
            set_determinism(cfg.train.deterministic)
        if precision == "bf16" and not on_gpu:
            warnings.warn("train.precision=bf16 on CPU is slow; it is honoured as asked", stacklevel=2)
        native = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        use_bf16 = auto_uses_bf16(precision, on_gpu, native, device)
        channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else on_gpu
        return cls(device, torch.bfloat16 if use_bf16 else None, channels_last)
