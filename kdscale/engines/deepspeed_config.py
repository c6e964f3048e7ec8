"""Choosing the strategy and building the DeepSpeed config from the kdscale config.

kdscale's config is the single source of truth for batch sizes, accumulation, clipping,
precision and the optimizer; a DeepSpeed JSON may set ZeRO details (bucket sizes,
overlap, offload) but a value that contradicts the kdscale config is an error that says
which key to change. ``"auto"`` values (accelerate's convention) are filled in.
"""

from __future__ import annotations

import json
import os

from kdscale.config.schema import ExperimentConfig
from kdscale.errors import KdscaleError
from kdscale.runtime.device import autocast_section

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def resolve_strategy(cfg: ExperimentConfig) -> str:
    """``ddp`` or ``zero<N>``; ``auto`` follows ``accelerate launch --use_deepspeed``."""
    strategy = cfg.distributed.strategy
    if strategy != "auto":
        return strategy
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return "ddp"
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        stage = _read_json(_config_path(cfg)).get("zero_optimization", {}).get("stage", 2) if _config_path(cfg) else 2
    if str(stage) not in ("1", "2", "3"):
        raise KdscaleError(f"ZeRO stage {stage!r} from the launcher is not supported; use 1, 2 or 3 "
                           f"(or distributed.strategy=ddp)")
    return f"zero{stage}"


def _config_path(cfg: ExperimentConfig) -> str | None:
    return cfg.distributed.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise KdscaleError(f"distributed.deepspeed_config: file not found: {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise KdscaleError(f"{path}: not valid JSON ({err})") from None


def _is_auto(value) -> bool:
    return value is None or value == "auto"


def build_deepspeed_config(cfg: ExperimentConfig, stage: int, world_size: int, autocast_dtype=None) -> dict:
    path = _config_path(cfg)
    ds = _read_json(path) if path else {}
    where = path or "the DeepSpeed config"
    if "torch_autocast" in ds:
        raise KdscaleError(f"{where}: remove the 'torch_autocast' section; kdscale sets it from train.precision")
    ds["torch_autocast"] = autocast_section(autocast_dtype)
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise KdscaleError(f"{where}: remove the '{owned}' section; kdscale builds the optimizer and lr schedule "
                               f"from the optim section of its config")
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
    wanted = {"train_micro_batch_size_per_gpu": (micro, "data.batch_size"),
              "gradient_accumulation_steps": (accum, "train.grad_accum_steps"),
              "train_batch_size": (micro * accum * world_size,
                                   "data.batch_size x train.grad_accum_steps x processes")}
    for key, (value, source) in wanted.items():
        if not _is_auto(ds.get(key)) and ds[key] != value:
            raise KdscaleError(f"{where}: {key}={ds[key]} conflicts with {source}={value}; set it to \"auto\" "
                               f"or change {source}")
        ds[key] = value
    clip = cfg.train.clip_grad_norm or 0.0
    if not _is_auto(ds.get("gradient_clipping")) and float(ds["gradient_clipping"]) != clip:
        raise KdscaleError(f"{where}: gradient_clipping={ds['gradient_clipping']} conflicts with "
                           f"train.clip_grad_norm={cfg.train.clip_grad_norm}; set it to \"auto\" or change "
                           f"train.clip_grad_norm")
    ds["gradient_clipping"] = clip
    for precision in ("fp16", "bf16"):
        enabled = ds.get(precision, {}).get("enabled", False)
        if enabled not in (False, "auto"):
            raise KdscaleError(f"{where}: {precision}.enabled is true; kdscale applies mixed precision itself "
                               f"(train.precision: bf16 autocast on GPU by default), so set {precision}.enabled "
                               f"to false or \"auto\"")
        if precision in ds:
            ds[precision]["enabled"] = False
    zero = ds.setdefault("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None, "auto"):
        raise KdscaleError(f"{where}: zero_optimization.offload_optimizer.device={offload}: ZeRO-Offload needs "
                           f"DeepSpeed's own CPU Adam, and kdscale hands DeepSpeed its own torch optimizer "
                           f"(optim section); remove offload_optimizer (ZeRO-3 partitions the optimizer state "
                           f"across processes instead)")
    if not _is_auto(zero.get("stage")) and int(zero["stage"]) != stage:
        raise KdscaleError(f"{where}: zero_optimization.stage={zero['stage']} conflicts with the requested "
                           f"ZeRO stage {stage} (distributed.strategy / --zero_stage); make them agree")
    zero["stage"] = stage
    ds["zero_allow_untested_optimizer"] = True  # kdscale hands DeepSpeed plain torch optimizers
    ds.setdefault("steps_per_print", 10**9)
    return ds
