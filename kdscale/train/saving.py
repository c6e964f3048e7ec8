"""What the Trainer writes and reads back: checkpoints (whether one fits this run,
restoring it, writing one: one file by rank 0 under DDP, DeepSpeed's shards under ZeRO)
and the student's export."""

from __future__ import annotations

import os

from kdscale.engines import engine_class
from kdscale.errors import KdscaleError
from kdscale.log import log
from kdscale.runtime import checkpoint as ckpt


class SavingMixin:
    def _check_resumable(self, path: str, state: dict) -> None:
        saved = state.get("strategy", "ddp")
        if saved != self.strategy:
            raise KdscaleError(f"checkpoint {path} was written under {saved}, this run uses {self.strategy}; resume "
                               f"with distributed.strategy={saved}, or start a new run (experiment.name) and take the "
                               f"weights from the old run's export/student.safetensors")
        if not engine_class(self.strategy).resumes_on_any_world_size and state.get("world_size") != self.world:
            raise KdscaleError(f"checkpoint {path} holds ZeRO shards of {state.get('world_size')} processes; resume on "
                               f"{state.get('world_size')} processes (DDP checkpoints resume on any number)")

    def _restore(self, path: str, state: dict) -> str | None:
        try:
            self.engine.restore(path, state)
        except (RuntimeError, KeyError) as err:
            raise KdscaleError(f"checkpoint {path} does not fit this config's networks "
                               f"({str(err).splitlines()[0]}); use another experiment.name or train.resume=false") from None
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        self.last_metrics = dict(state.get("metrics", {}))
        self.last_saved_step = self.step
        if state.get("world_size") != self.world:
            log.info(f"resuming a {state.get('world_size')}-process run on {self.world} processes: the epoch's "
                     f"data split restarts (no sample is lost; the order differs)")
            self.batches_done = 0
        if state.get("method_state") is not None:
            self.distiller.restore_gathered_state(state["method_state"])
        self.window.restore(state.get("metrics_window"), self.rank, self.world, self.ctx.device)
        ckpt.restore_rng_state(state["rng"], self.rank, self.world)
        log.info(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batches_done})")
        return state.get("wandb_run_id")

    def save(self) -> None:
        if self.step == self.last_saved_step:
            return
        self._settle()  # a non-finite step not yet agreed on fails the run before its weights are written
        with self.watchdog.waiting("writing a checkpoint"):
            self.sync_buffers()
            meta = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_done,
                    "rng": ckpt.capture_rng_state(self.ctx), "wandb_run_id": self.tracker.run_id, "config": self.resolved,
                    "world_size": self.world, "strategy": self.strategy, "metrics": self.last_metrics,
                    "method_state": self.distiller.gathered_state(), "metrics_window": self.window.state(self.ctx)}
            self.engine.write_checkpoint(self.cfg.run_dir, meta, self.step, self.cfg.train.keep_checkpoints)
        self.watchdog.progress()
        self.last_saved_step = self.step

    def _export(self, state: dict) -> str:
        """The student alone, as safetensors, loadable into the plain model."""
        from safetensors.torch import save_file

        path = os.path.join(self.cfg.run_dir, "export", "student.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(state, f"{path}.tmp-{os.getpid()}")
        os.replace(f"{path}.tmp-{os.getpid()}", path)
        return path
