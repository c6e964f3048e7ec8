"""The training loop: an engine (DDP or DeepSpeed ZeRO) owns every trainable network of
the Distiller, frozen teachers run beside it, rank 0 tracks.

Resuming picks the newest complete checkpoint in the run directory and continues the
same schedule, data stream (skipping the batches already seen) and wandb run.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time

import torch

from kdscale.config import config_to_dict, format_config
from kdscale.config.schema import ExperimentConfig
from kdscale.data.loader import TrainStream, ValStream, make_loader
from kdscale.data.mixing import mix_batch, mixing_enabled
from kdscale.dist.context import DistContext
from kdscale.dist.deepspeed_config import resolve_strategy
from kdscale.dist.engines import make_engine
from kdscale.errors import KdscaleError
from kdscale.methods import TeacherOutput
from kdscale.train import checkpoint as ckpt
from kdscale.train.evaluate import evaluate
from kdscale.train.optim import lr_at
from kdscale.progress import ProgressBar
from kdscale.train.setup import Runtime, build_distiller, plan_data
from kdscale.train.tracking import Tracker


class Trainer:
    def __init__(self, cfg: ExperimentConfig, ctx: DistContext | None = None):
        self.cfg = cfg
        self.ctx = ctx or DistContext.from_env(cfg.distributed.timeout_s)
        self.rank, self.world, self.is_main = self.ctx.rank, self.ctx.world_size, self.ctx.is_main
        self.resolved = config_to_dict(cfg)
        self.strategy = resolve_strategy(cfg)
        if self.is_main:
            print(f"kdscale: resolved config ({self.world} process(es), {self.strategy}, device {self.ctx.device}):\n"
                  f"{format_config(cfg)}", flush=True)
        torch.manual_seed(cfg.experiment.seed)  # identical initial weights on every rank
        self.runtime = Runtime.from_config(cfg, self.ctx.device)
        self.plan = plan_data(cfg, self.world)
        self.distiller, self.teacher = build_distiller(cfg, self.runtime, self.world)
        self.phases = self.distiller.optimizer_phases
        from_shards = cfg.teacher is not None and cfg.teacher.source == "shards"
        self.teacher_outputs_dir = cfg.teacher.outputs if from_shards else None
        if len(self.phases) > 1 and cfg.train.grad_accum_steps != 1:
            raise KdscaleError(f"method {cfg.method.name!r} takes one optimizer step per phase "
                               f"({', '.join(self.phases)}); set train.grad_accum_steps=1")
        resumed = ckpt.load_latest_checkpoint(cfg.run_dir) if cfg.train.resume else None
        if resumed is not None:
            self._check_resumable(*resumed)
        self.engine = make_engine(self.strategy, self.distiller, cfg, self.ctx)
        self.total_steps = self.plan.steps_per_epoch * cfg.train.epochs
        self.step, self.epoch, self.batches_done, run_id = 0, 0, 0, None
        self.last_metrics: dict[str, float] = {}
        self.last_saved_step = -1
        if resumed is not None:
            run_id = self._restore(*resumed)
        self.tracker = Tracker(cfg, self.resolved, run_id, self.is_main)

    # -- checkpoints ----------------------------------------------------------------
    def _check_resumable(self, path: str, state: dict) -> None:
        saved = state.get("strategy", "ddp")
        if saved != self.strategy:
            raise KdscaleError(f"checkpoint {path} was written under {saved}, this run uses {self.strategy}; resume "
                               f"with distributed.strategy={saved}, or start a new run (experiment.name) and take the "
                               f"weights from the old run's export/student.safetensors")
        if saved != "ddp" and state.get("world_size") != self.world:
            raise KdscaleError(f"checkpoint {path} holds ZeRO shards of {state.get('world_size')} processes; resume on "
                               f"{state.get('world_size')} processes (DDP checkpoints resume on any number)")

    def _restore(self, path: str, state: dict) -> str | None:
        try:
            if self.strategy == "ddp":
                self.engine.load_checkpoint_state(state)
            else:
                self.engine.load_sharded(path)
                for name, buffer in self.distiller.named_buffers():
                    buffer.copy_(state["buffers"][name])
        except (RuntimeError, KeyError) as err:
            raise KdscaleError(f"checkpoint {path} does not fit this config's networks "
                               f"({str(err).splitlines()[0]}); use another experiment.name or train.resume=false") from None
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        self.last_metrics = dict(state.get("metrics", {}))
        self.last_saved_step = self.step
        if state.get("world_size") != self.world:
            if self.is_main:
                print(f"kdscale: resuming a {state.get('world_size')}-process run on {self.world} processes: the "
                      f"epoch's data split restarts (no sample is lost; the order differs)", flush=True)
            self.batches_done = 0
        ckpt.restore_rng_state(state["rng"])
        if self.is_main:
            print(f"kdscale: resumed from {path} at step {self.step} (epoch {self.epoch}, "
                  f"batch {self.batches_done})", flush=True)
        return state.get("wandb_run_id")

    def save(self) -> None:
        if self.step == self.last_saved_step:
            return
        self.sync_buffers()
        meta = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_done,
                "rng": ckpt.capture_rng_state(), "wandb_run_id": self.tracker.run_id, "config": self.resolved,
                "world_size": self.world, "strategy": self.strategy, "metrics": self.last_metrics}
        keep = self.cfg.train.keep_checkpoints
        if self.strategy == "ddp":
            if self.is_main:
                ckpt.save_checkpoint(self.cfg.run_dir, {**self.engine.state_for_checkpoint(), **meta}, self.step, keep)
            self.ctx.barrier()
        else:
            meta["buffers"] = {name: b.detach().cpu() for name, b in self.distiller.named_buffers()}
            ckpt.save_sharded_checkpoint(self.cfg.run_dir, self.engine.save_sharded, meta, self.step, keep, self.ctx)
        self.last_saved_step = self.step

    # -- the loop -------------------------------------------------------------------
    def _train_loader(self):
        stream = TrainStream(self.plan.train_shards, self.cfg.data, seed=self.cfg.experiment.seed,
                             epoch=self.epoch, rank=self.rank, world_size=self.world,
                             batches_per_rank=self.plan.micro_batches_per_epoch, skip_batches=self.batches_done,
                             teacher_outputs=self.teacher_outputs_dir)
        return make_loader(stream, self.cfg.data, pin_memory=self.runtime.device.type == "cuda")

    def _val_loader(self):
        stream = ValStream(self.plan.val_shards, self.cfg.data, rank=self.rank, world_size=self.world)
        return make_loader(stream, self.cfg.data, pin_memory=self.runtime.device.type == "cuda")

    def _to_device(self, images, targets):
        images = images.to(self.runtime.device, non_blocking=True)
        if self.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.runtime.device, non_blocking=True)

    def _autocast(self):
        if self.runtime.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.autocast_dtype)

    def train(self) -> dict:
        cfg, accum = self.cfg.train, self.cfg.train.grad_accum_steps
        stop_at = min(self.total_steps, cfg.stop_after_steps or self.total_steps)
        bar = ProgressBar(self.total_steps, self.step, enabled=self.is_main)
        window = {"start": time.perf_counter(), "wait": 0.0, "images": 0, "losses": {}, "count": 0}
        fail_at = int(os.environ.get("KDSCALE_FAIL_AT_STEP", "-1")), int(os.environ.get("KDSCALE_FAIL_RANK", "-1"))
        stopped_early = False
        self.preempted = False
        preempt_file = cfg.preempt_file or os.environ.get("KDSCALE_PREEMPT_FILE")
        self.teacher_best = None
        if self.step == 0 and self.distiller.teacher_role == "trainable" and self.cfg.teacher.weights:
            self._record_validation(bar)  # the trained teacher's starting accuracy, at step 0
        while self.epoch < cfg.epochs and self.step < stop_at and not self.preempted:
            self.distiller.set_epoch(self.epoch)
            loader = iter(self._train_loader())
            self.skipped: dict[int, int] = {}
            while True:
                fetch_start = time.perf_counter()
                batch = next(loader, None)
                window["wait"] += time.perf_counter() - fetch_start
                if batch is None:
                    break
                images, targets = self._to_device(batch.images, batch.targets)
                self.skipped[batch.skipped[0]] = batch.skipped[1]
                probs = batch.teacher_probs
                if probs is not None:
                    probs = probs.to(self.runtime.device, non_blocking=True)
                if mixing_enabled(self.cfg.data):
                    draw = self.cfg.experiment.seed
                    for part in (self.rank, self.epoch, self.batches_done):
                        draw = (draw * 1_000_003 + part) % 2**62
                    gen = torch.Generator().manual_seed(draw)
                    images, targets, probs = mix_batch(images, targets, self.cfg.data, gen, probs)
                if probs is not None:  # replayed from teacher-output shards
                    teacher_output = TeacherOutput(probs.clamp_min(1e-12).log())
                else:
                    teacher_output = self.teacher(images) if self.teacher is not None else None
                sync = (self.batches_done + 1) % accum == 0
                lr = lr_at(self.step, self.plan.steps_per_epoch, self.total_steps, self.cfg.optim)
                for phase in self.phases:
                    losses = self.engine.micro_step(phase, images, targets, teacher_output, sync, lr, self._autocast)
                    for name, value in losses.items():
                        window["losses"][name] = window["losses"].get(name, 0.0) + value.detach()
                self.batches_done += 1
                window["images"] += images.shape[0] * self.world
                window["count"] += 1
                if not sync:
                    continue
                self.step += 1
                if self.step == fail_at[0] and self.rank == fail_at[1]:  # fault injection for the tests
                    raise RuntimeError(f"injected failure at step {self.step} (KDSCALE_FAIL_AT_STEP)")
                if self.step % cfg.log_every_steps == 0 or self.step == stop_at:
                    self._log_window(window, lr, bar)
                bar.update(self.step)
                if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                    self.save()
                if preempt_file and self.step % cfg.preempt_check_steps == 0 and self._preempt_requested(preempt_file):
                    self.preempted = True
                    break
                if self.step >= stop_at:
                    break
            if self.batches_done >= self.plan.micro_batches_per_epoch:
                self.epoch, self.batches_done = self.epoch + 1, 0
                if self.epoch == cfg.epochs or self.epoch % cfg.eval_every_epochs == 0:
                    self._record_validation(bar)
                self.save()
            elif self.step >= stop_at or self.preempted:
                stopped_early = True
                self.save()
        if self.preempted and self.is_main:
            print(f"kdscale: preempted: checkpoint at step {self.step} written; relaunch to resume", flush=True)
        bar.close()
        return self._finish(stopped_early)

    def _record_validation(self, bar: ProgressBar) -> None:
        self.last_metrics = self.validate()
        self.tracker.log({**self.last_metrics, "epoch": self.epoch}, self.step)
        bar.write(self._format_metrics(self.last_metrics))
        accuracy = self.last_metrics.get("val/teacher_top1")
        if self.distiller.teacher_role != "trainable" or accuracy is None:
            return
        if self.teacher_best is not None and accuracy < self.teacher_best - 10 and self.is_main:
            print(f"kdscale: warning: the trained teacher's val/teacher_top1 fell to {accuracy:.2f}, more than 10 "
                  f"points below its best of {self.teacher_best:.2f} (step {self.step}); the student learns from "
                  f"it: check the teacher's lr (e.g. method.teacher_lr_scale)", flush=True)
        self.teacher_best = max(accuracy, self.teacher_best or accuracy)

    def _preempt_requested(self, path: str) -> bool:
        """Rank 0 looks for the file; all ranks learn the answer at the same step."""
        flag = torch.tensor([1.0 if self.is_main and os.path.exists(path) else 0.0], device=self.ctx.device)
        return self.ctx.all_reduce(flag, "max").item() > 0

    def _log_window(self, window: dict, lr: float, bar: ProgressBar) -> None:
        elapsed = max(1e-9, time.perf_counter() - window["start"])
        names = sorted(window["losses"])
        metrics = {}
        if names:
            values = torch.stack([window["losses"][n] / window["count"] for n in names]).float()
            values = self.ctx.all_reduce(values.to(self.ctx.device), "mean")
            metrics = {f"train/loss_{n}": v for n, v in zip(names, values.tolist())}
        metrics["train/loss"] = sum(metrics.values())
        metrics.update({"train/lr": lr, "train/epoch": self.epoch, "perf/images_per_s": window["images"] / elapsed,
                        "data/skipped_samples": sum(self.skipped.values()),
                        "perf/data_wait_frac": window["wait"] / elapsed,
                        "mem/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        if self.runtime.device.type == "cuda":
            metrics["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.tracker.log(metrics, self.step)
        bar.set_postfix(loss=metrics["train/loss"], img_s=metrics["perf/images_per_s"])
        self.throughput = metrics["perf/images_per_s"]
        window.update(start=time.perf_counter(), wait=0.0, images=0, losses={}, count=0)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN statistics): each rank updated them from
        its own batches since the last broadcast (DDP broadcasts at each forward, ZeRO never)."""
        for buffer in self.distiller.buffers():
            self.ctx.broadcast(buffer, src=0)

    def validate(self) -> dict[str, float]:
        self.sync_buffers()
        lockstep = self.engine.shards_parameters or (self.teacher is not None and self.teacher.lockstep)
        return evaluate(self.distiller, self.teacher, self._val_loader(), self.ctx, self.runtime.autocast_dtype,
                        self.runtime.channels_last, self.cfg.data.image_size, lockstep=lockstep)

    @staticmethod
    def _format_metrics(metrics: dict[str, float]) -> str:
        shown = {k: v for k, v in metrics.items() if k.endswith("_top1")}
        return "kdscale: " + ", ".join(f"{k}={v:.2f}" for k, v in shown.items())

    def ranks_agree(self) -> bool | None:
        """Whether every rank holds the same trained weights (None under ZeRO-3, where each
        holds only its partition)."""
        if self.engine.shards_parameters:
            return None
        flat = torch.cat([p.detach().double().flatten() for p in self.distiller.parameters()])
        signature = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).to(self.ctx.device)
        gathered = self.ctx.gather(signature)
        return bool((gathered == gathered[0]).all())

    def _finish(self, stopped_early: bool) -> dict:
        agree = self.ranks_agree()
        if agree is False and self.is_main:
            print("kdscale: warning: the ranks ended with different weights; gradient synchronisation failed",
                  flush=True)
        completed = not stopped_early and self.step >= self.total_steps
        student_state = self.engine.gathered_student_state() if completed else None  # a collective under ZeRO-3
        summary = {"run_dir": self.cfg.run_dir, "experiment": self.cfg.experiment.name,
                   "method": self.cfg.method.name, "strategy": self.strategy, "step": self.step,
                   "total_steps": self.total_steps, "epoch": self.epoch, "completed": completed,
                   "images_per_s": getattr(self, "throughput", None), "metrics": self.last_metrics,
                   "checkpoint": (ckpt.list_checkpoints(self.cfg.run_dir) or [None])[-1],
                   "wandb_mode": self.tracker.mode, "wandb_sync": self.tracker.sync_hint(),
                   "world_size": self.world, "ranks_agree": agree, "preempted": self.preempted}
        if self.is_main:
            if student_state is not None:
                summary["export"] = self._export(student_state)
            path = os.path.join(self.cfg.run_dir, "summary.json")
            with open(path + ".tmp", "w") as fh:
                json.dump(summary, fh, indent=2)
            os.replace(path + ".tmp", path)
        self.tracker.finish()
        self.ctx.barrier()
        return summary

    def _export(self, state: dict) -> str:
        """The student alone, as safetensors, loadable into the plain model."""
        from safetensors.torch import save_file

        path = os.path.join(self.cfg.run_dir, "export", "student.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        return path
