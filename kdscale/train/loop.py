"""The training loop: an engine (DDP or DeepSpeed ZeRO) owns every trainable network of
the Distiller, frozen teachers run beside it, rank 0 tracks.

Resuming picks the newest complete checkpoint in the run directory and continues the
same schedule, data stream (skipping the batches already seen) and wandb run. One loader
serves the whole run (its workers start once). A run owns its directory (a lock), stops
on any signal at a step every rank agrees on with a checkpoint, ends on a stall instead
of hanging (:mod:`kdscale.lifecycle`), and never writes a checkpoint or export from weights a
non-finite loss touched (``train.nonfinite``; the ranks' agreement: :mod:`.agreement`).
"""

from __future__ import annotations

import json
import os

import torch

from kdscale import checkpoints as ckpt
from kdscale.checkpoints import Checkpointer
from kdscale.config import config_to_dict, format_config
from kdscale.config.schema import ExperimentConfig
from kdscale.engines import engine_class, make_engine
from kdscale.engines.deepspeed_config import resolve_strategy
from kdscale.errors import KdscaleError
from kdscale.lifecycle.fault_injection import InjectedFailure
from kdscale.lifecycle.job import Job
from kdscale.log import log, setup_logging
from kdscale.progress import ProgressBar
from kdscale.runtime.device import Runtime
from kdscale.runtime.optim import lr_at
from kdscale.runtime.tracking import Tracker
from kdscale.train.agreement import StepAgreement, Verdict
from kdscale.train.evaluate import evaluate
from kdscale.train.feature_statistics import gather_feature_statistics
from kdscale.train.inputs import TrainerInputs
from kdscale.train.knn_eval import KnnScores, knn_memory_shards
from kdscale.train.setup import (
    build_distiller,
    check_compile_fits,
    plan_data,
    training_labels,
)
from kdscale.train.teacher_source import teacher_source
from kdscale.train.window import MetricsWindow, describe_losses


class Trainer:
    def __init__(self, cfg: ExperimentConfig, job: Job | None = None):
        """``job``: the entry point's (:mod:`kdscale.lifecycle.job`); without one the trainer
        makes its own, whose watchdog and stop signals run only while :meth:`train` does, and
        ends it in :meth:`close` (or at once, if building the run fails)."""
        self.cfg = cfg
        self.own_job = job is None
        self.job = job or Job.for_training(cfg, from_start=False).__enter__()
        try:
            self._build(cfg)
        except BaseException:
            if self.own_job:
                self.job.close(failed=True)
            raise

    def _build(self, cfg: ExperimentConfig) -> None:
        self.ctx, self.watchdog, self.stop = self.job.ctx, self.job.watchdog, self.job.stop
        self.rank, self.world, self.is_main = self.ctx.rank, self.ctx.world_size, self.ctx.is_main
        setup_logging(self.rank)
        self.tracker: Tracker | None = None
        if self.is_main:
            ckpt.remove_stale_temporaries(cfg.run_dir)  # left by a writer that was killed
        self.resolved = config_to_dict(cfg)
        self.strategy = resolve_strategy(cfg)
        check_compile_fits(cfg, self.strategy)
        log.info(f"resolved config ({self.world} process(es), {self.strategy}, device {self.ctx.device}):\n"
                 f"{format_config(cfg)}")
        torch.manual_seed(cfg.experiment.seed)  # identical initial weights on every rank
        resumed = Checkpointer.newest(cfg.run_dir, self.strategy, self.world,
                                      engine_class(self.strategy).resumes_on_any_world_size) \
            if cfg.train.resume else None
        if resumed is not None:  # another world size keeps the global batch: before the data plan
            Checkpointer.keep_global_batch(cfg, *resumed, self.world)
            self.resolved = config_to_dict(cfg)
        self.runtime = Runtime.from_config(cfg, self.ctx.device)
        self.plan = plan_data(cfg, self.world)
        labels = training_labels(self.plan, self.ctx, self.watchdog.progress)  # a long scan is no stall
        self.distiller, frozen = build_distiller(cfg, self.runtime, self.world, labels)
        self.teacher = teacher_source(cfg, frozen, self.watchdog, self.distiller.teacher_role == "frozen")
        self.knn_memory = knn_memory_shards(cfg, type(self.distiller))  # None: no k-NN in validation
        self.inputs = TrainerInputs(cfg, self.plan, self.runtime, self.rank, self.world, self.watchdog,
                                    self.teacher.outputs_dirs)
        self.phase_names = tuple(self.distiller.phases())
        if len(self.phase_names) > 1 and cfg.train.grad_accum_steps != 1:
            raise KdscaleError(f"method {cfg.method.name!r} takes one optimizer step per phase "
                               f"({', '.join(self.phase_names)}); set train.grad_accum_steps=1")
        self.engine = make_engine(self.strategy, self.distiller, cfg, self.ctx, self.runtime.autocast_dtype)
        self.checkpoints = Checkpointer(cfg, self.ctx, self.engine, self.strategy, self.resolved)
        ckpt.seed_per_rank(cfg.experiment.seed, self.rank)  # own dropout masks; a resume restores each rank's own
        if cfg.train.nonfinite == "skip" and self.engine.counts_accumulation_itself and cfg.train.grad_accum_steps > 1:
            raise KdscaleError(f"train.nonfinite=skip under {self.strategy} needs train.grad_accum_steps=1 (DeepSpeed "
                               f"counts the accumulation itself); use train.nonfinite=stop or train.grad_accum_steps=1")
        self.total_steps = self.plan.steps_per_epoch * cfg.train.epochs
        self.stop_at = min(self.total_steps, cfg.train.stop_after_steps or self.total_steps)
        self.step, self.epoch, self.batches_done, run_id = 0, 0, 0, None
        self.last_metrics: dict[str, float] = {}
        self.teacher_best: float | None = None
        self.throughput: float | None = None
        self.failure: str | None = None
        self.nonfinite_skipped = self.nonfinite_in_a_row = 0
        self.injected_failure = InjectedFailure()
        self.agreement = StepAgreement(self.ctx, deferred=cfg.train.nonfinite == "stop")
        self.latest_terms: dict[str, torch.Tensor] = {}
        self.window = MetricsWindow()
        if resumed is not None:
            run_id = self.checkpoints.restore(self, *resumed)
        self.tracker = self.job.track(Tracker(cfg, self.resolved, run_id, self.is_main))
        self.watchdog.progress()

    # -- the loop -------------------------------------------------------------------
    def train(self) -> dict:
        with self.job.running():
            return self._train()

    def _work_left(self) -> bool:
        return self.epoch < self.cfg.train.epochs and self.step < self.stop_at and not self.stop.acted

    def _train(self) -> dict:
        bar = ProgressBar(self.total_steps, self.step, enabled=self.is_main)
        window = self.window  # restored from the checkpoint on a resume
        if self.step == 0 and self.distiller.teacher_role == "trainable" and self.cfg.teachers[0].weights:
            self._record_validation(bar)  # the trained teacher's starting accuracy, at step 0
        gather_feature_statistics(self.distiller, self.teacher, self.inputs, self.ctx, self.watchdog,
                                  getattr(self.cfg.method.params, "standardize_batches", 0))  # none after a resume
        loader = iter(self.inputs.train_loader(self.epoch, self.batches_done)) if self._work_left() else None
        self.distiller.set_epoch(self.epoch)  # a resumed epoch keeps its window's counts
        if self.batches_done == 0:
            window.bad_samples_epoch = 0
        while self._work_left():
            batch = self.inputs.next_batch(loader, window)
            stepped, lr = self._step(batch, window)
            self._after_step(stepped, lr, window, bar)
        del loader  # ends the loader's workers
        if self.stop.acted:
            log.info(f"{self.stop.describe()}: stopped at step {self.step} with a checkpoint; run the same command again to "
                     f"resume from it")
        bar.close()
        return self._finish()

    def _start_epoch(self, window: MetricsWindow) -> None:
        self.distiller.set_epoch(self.epoch)
        window.bad_samples_epoch = 0

    def _step(self, batch, window: MetricsWindow) -> tuple[bool, float]:
        """One micro-batch through every phase; (whether it ended an optimizer step, lr)."""
        images, targets, probs, indices = self.inputs.on_device(batch, self.epoch, self.batches_done)
        teacher_output = self.teacher(images, probs)
        sync = (self.batches_done + 1) % self.cfg.train.grad_accum_steps == 0
        lr = lr_at(self.step, self.plan.steps_per_epoch, self.total_steps, self.cfg.optim)
        with self.watchdog.waiting("in the training step (forward, backward, gradient all-reduce)"):
            for phase in self.phase_names:
                losses, went_on = self.engine.micro_step(phase, images, targets, teacher_output, sync, lr,
                                                         self.runtime.autocast, self._proceed, sample_indices=indices)
                if not went_on:
                    break
                self.latest_terms = losses
                window.add_losses(losses)
        if not went_on:
            self.nonfinite_in_a_row += 1
            self._on_nonfinite(losses, self.nonfinite_in_a_row)
        elif sync:
            self.nonfinite_in_a_row = 0
        self.batches_done += 1
        window.add_batch(images.shape[0] * self.world)
        return sync, lr

    def _after_step(self, stepped: bool, lr: float, window: MetricsWindow, bar: ProgressBar) -> None:
        """Log, checkpoint, look for a stop, end the epoch: whatever is due after a micro-batch."""
        cfg = self.cfg.train
        if stepped:
            self.step += 1
            self.watchdog.progress()
            self.injected_failure.check(self.step, self.rank)
            # Not at a stop_after_steps stop: the resumed run's windows then equal an uninterrupted run's.
            if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                self._log_window(window, lr, bar)
            bar.update(self.step)
            if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                self.save()
            if self.is_main and self.step % cfg.preempt_check_steps == 0:
                self.stop.look_for_file()  # the others learn it at the next agreement
            self.stop.acted = self.stop.agreed
        if self.batches_done >= self.plan.micro_batches_per_epoch:
            self.epoch, self.batches_done = self.epoch + 1, 0
            # Asked to stop: the checkpoint now, this epoch's validation is skipped (but the last).
            if self.epoch == cfg.epochs or (self.epoch % cfg.eval_every_epochs == 0 and not self.stop.acted):
                self._record_validation(bar)
            self.save()
            self._start_epoch(window)
        elif self.stop.acted or (stepped and self.step >= self.stop_at):
            self.save()

    def _on_nonfinite(self, losses: dict, in_a_row: int, where: str | None = None) -> None:
        """A micro-step's loss was not finite on some rank: skip it (``skip``) or fail the run."""
        cfg = self.cfg.train
        terms = describe_losses(losses)
        where = where or f"step {self.step + 1} (epoch {self.epoch}, batch {self.batches_done}) on rank {self.rank}"
        if cfg.nonfinite == "skip" and in_a_row <= cfg.max_nonfinite_skips:
            self.nonfinite_skipped += 1
            log.warning(f"non-finite loss at {where} ({terms}): step skipped ({in_a_row} in a row)")
            return
        last = (ckpt.list_checkpoints(self.cfg.run_dir) or ["none"])[-1]
        reason = (f"{in_a_row} non-finite steps in a row (train.max_nonfinite_skips={cfg.max_nonfinite_skips})"
                  if cfg.nonfinite == "skip" else "the loss is not finite")
        self.failure = (f"{reason} at {where}: {terms}; the last good checkpoint is kept ({last}) and nothing is "
                        f"exported; lower optim.lr, check the method's temperatures and weights, or set "
                        f"train.nonfinite=skip")
        self._finish()
        raise KdscaleError(self.failure)

    def _record_validation(self, bar: ProgressBar) -> None:
        self._settle()
        with self.watchdog.waiting("validating"):
            self.last_metrics = self.validate()
        self.watchdog.progress()
        self.tracker.log({**self.last_metrics, "epoch": self.epoch}, self.step)
        bar.write(self._format_metrics(self.last_metrics))
        accuracy = self.last_metrics.get("val/teacher_top1")
        if self.distiller.teacher_role != "trainable" or accuracy is None:
            return
        if self.teacher_best is not None and accuracy < self.teacher_best - 10:
            log.warning(f"the trained teacher's val/teacher_top1 fell to {accuracy:.2f}, more than 10 points below "
                        f"its best of {self.teacher_best:.2f} (step {self.step}); the student learns from it: check "
                        f"the teacher's lr (e.g. method.teacher_lr_scale)")
        self.teacher_best = max(accuracy, self.teacher_best or accuracy)

    def _proceed(self, loss: torch.Tensor) -> bool:
        """The one collective of a micro-step, before its backward (:mod:`kdscale.train.agreement`):
        is the loss finite on every rank, and has any rank been asked to stop (a signal, or the
        preemption file seen by rank 0)? Every rank gets the same answers at the same micro-step."""
        where = f"step {self.step + 1} (epoch {self.epoch}, batch {self.batches_done}) on rank {self.rank}"
        return self._take(self.agreement.exchange(loss, self.stop.local_cause(), where))

    def _take(self, verdict: Verdict | None) -> bool:
        """Act on an agreement's verdict; whether the micro-step that asked may go on."""
        if verdict is None:
            return True
        self.stop.agree(verdict.stop)
        if verdict.nonfinite and self.agreement.deferred:  # train.nonfinite=stop: fails, naming that step
            self._on_nonfinite(self.latest_terms, 1, verdict.where)
        return not verdict.nonfinite

    def _settle(self) -> None:
        """Read the agreement still pending, before anything is written or logged from the weights."""
        self._take(self.agreement.settle())

    def _log_window(self, window: MetricsWindow, lr: float, bar: ProgressBar) -> None:
        self._settle()
        metrics = window.metrics(self.ctx, lr, self.epoch, self.runtime.device)
        self.tracker.log(metrics, self.step)
        bar.set_postfix(loss=metrics["train/loss"], img_s=metrics["perf/images_per_s"])
        self.throughput = metrics["perf/images_per_s"]

    def save(self) -> None:
        """A checkpoint now (:class:`kdscale.checkpoints.Checkpointer`), once the pending
        agreement is read: a non-finite step not yet agreed on fails the run before its weights
        are written."""
        if self.step != self.checkpoints.last_saved_step:
            self._settle()
        self.checkpoints.save(self)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN statistics): each rank updated them from
        its own batches since the last broadcast (DDP broadcasts at each forward, ZeRO never)."""
        for buffer in self.distiller.buffers():
            self.ctx.broadcast(buffer, src=0)

    def validate(self) -> dict[str, float]:
        self.sync_buffers()
        lockstep = self.engine.shards_parameters or self.teacher.lockstep
        knn = KnnScores(self.knn_memory, self.cfg, self.ctx, self.runtime.device.type == "cuda",
                        self.runtime.channels_last) if self.knn_memory else None
        return evaluate(self.distiller, self.teacher, self.inputs.val_loader(), self.ctx, self.runtime.autocast_dtype,
                        self.runtime.channels_last, self.cfg.data.image_size, lockstep=lockstep, knn=knn)

    @staticmethod
    def _format_metrics(metrics: dict[str, float]) -> str:
        shown = {k: v for k, v in metrics.items() if k.endswith("_top1")}
        return "kdscale: " + ", ".join(f"{k}={v:.2f}" for k, v in shown.items())

    def ranks_agree(self) -> bool | None:
        """Whether every rank holds the same trained weights (None under ZeRO-3, where each
        holds only its partition). NaN equals NaN here: equal weights, whatever they hold."""
        if self.engine.shards_parameters:
            return None
        flat = torch.cat([p.detach().double().flatten() for p in self.distiller.parameters()])
        signature = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).to(self.ctx.device)
        gathered = self.ctx.gather(signature)
        same = (gathered == gathered[0]) | (gathered.isnan() & gathered[0].isnan())
        return bool(same.all())

    def _finish(self) -> dict:
        if self.failure is None:
            self._settle()
        failure = self.failure
        agree = self.ranks_agree()
        if agree is False:
            log.warning("the ranks ended with different weights; gradient synchronisation failed")
        completed = failure is None and self.step >= self.total_steps
        student_state = self.engine.gathered_student_state() if completed else None  # a collective under ZeRO-3
        summary = {"run_dir": self.cfg.run_dir, "experiment": self.cfg.experiment.name,
                   "method": self.cfg.method.name, "strategy": self.strategy, "step": self.step,
                   "total_steps": self.total_steps, "epoch": self.epoch, "completed": completed,
                   "images_per_s": self.throughput, "metrics": self.last_metrics,
                   "checkpoint": (ckpt.list_checkpoints(self.cfg.run_dir) or [None])[-1],
                   "wandb_mode": self.tracker.mode, "wandb_sync": self.tracker.sync_hint(),
                   "world_size": self.world, "ranks_agree": agree, "preempted": self.stop.acted,
                   "stopped_by": self.stop.name if (self.stop.acted or self.stop.signals.received) else None,
                   "error": failure,
                   "nonfinite_skipped": self.nonfinite_skipped}
        if self.is_main:
            if student_state is not None:
                summary["export"] = self.checkpoints.export(student_state)
            path = os.path.join(self.cfg.run_dir, "summary.json")
            with open(f"{path}.tmp-{os.getpid()}", "w") as fh:
                json.dump(summary, fh, indent=2)
            os.replace(f"{path}.tmp-{os.getpid()}", path)
        self.tracker.finish(failed=failure is not None)
        self.ctx.barrier()
        return summary

    def close(self) -> None:
        """Flush the tracker; with a job of its own, also end it (watchdog, run directory's lock,
        process group). Safe to call after a failure and more than once."""
        if self.tracker is not None:
            self.tracker.finish(failed=True)  # a no-op after a clean finish
        if self.own_job:
            self.job.close()
