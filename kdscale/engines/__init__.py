"""Training engines: who owns the trainable networks, their optimizers and checkpoints.

Both implement :class:`Engine`, the one protocol the trainer uses.

- :class:`DDPEngine` (default): the whole Distiller in one DistributedDataParallel
  wrapper, one torch optimizer per phase (:meth:`Distiller.phases`). Checkpoints are one file written by
  rank 0; they resume on any number of ranks.
- :class:`DeepSpeedEngine`: DeepSpeed ZeRO stage 1, 2 or 3 over **every** trainable
  network: one engine over the whole Distiller, or, for a method with several optimizer
  phases (ProKT), one engine per phase module, each with its own optimizer. Checkpoints
  are DeepSpeed's sharded ones (every rank writes its shard) and resume on the same
  number of ranks only.

Frozen teachers never enter an engine: they are not part of the Distiller.

Modules: :mod:`.protocol` (the :class:`Engine` protocol), :mod:`.ddp`, :mod:`.zero`,
:mod:`.deepspeed_config` (the DeepSpeed config built from kdscale's). Frozen teachers never
enter an engine (:mod:`kdscale.teachers`).
"""

from __future__ import annotations

from kdscale.config.schema import ExperimentConfig
from kdscale.engines.ddp import DDPEngine
from kdscale.engines.zero import DeepSpeedEngine
from kdscale.methods import Distiller
from kdscale.parallel.context import DistContext


def engine_class(strategy: str) -> type:
    """The engine that runs ``strategy`` (for its class-level properties, before building it)."""
    return DDPEngine if strategy == "ddp" else DeepSpeedEngine


def make_engine(strategy: str, distiller: Distiller, cfg: ExperimentConfig, ctx: DistContext, autocast_dtype=None):
    """``autocast_dtype``: the run's autocast dtype (None: fp32), which DeepSpeed's engines must
    be told (:func:`kdscale.runtime.device.autocast_section`)."""
    if strategy == "ddp":
        return DDPEngine(distiller, cfg, ctx)
    from kdscale.engines.deepspeed_config import build_deepspeed_config

    stage = int(strategy[-1])
    return DeepSpeedEngine(distiller, cfg, ctx, stage,
                           build_deepspeed_config(cfg, stage, ctx.world_size, autocast_dtype))
