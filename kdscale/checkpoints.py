"""Checkpoints, in one module: the format and layout, what a checkpoint holds of a run, which
one a run may resume, retention, and the student's export (:class:`Checkpointer`). Engines
hand over their state and load it back; nothing else writes or reads a checkpoint.

Two layouts under ``<run>/checkpoints/``:
- DDP: ``step-<8 digits>.pt``, one file written by rank 0;
- DeepSpeed ZeRO: ``step-<8 digits>/``, a directory of per-rank shards plus ``meta.pt``.
Both are written under a temporary name unique to the writer (``.tmp-<pid>``) and renamed
only when complete (after an fsync), so a crash mid-write never leaves a checkpoint that
looks complete; the run-directory lock's holder removes the leftovers of killed writers. They hold every trainable
network, the optimizers, the step, the data position, RNG states, the wandb run id, the
strategy and world size, and the resolved config. Metadata is read with
``weights_only=True``; a checkpoint that fails to load is skipped with a warning and the
next older one is tried.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import re
import shutil
import warnings

import torch

from kdscale.errors import KdscaleError
from kdscale.log import log

CHECKPOINT_MARKER = "kdscale_checkpoint"
"""The key every kdscale checkpoint file carries (``weights: path.pt`` recognises one by it)."""
_NAME = re.compile(r"step-(\d{8})(\.pt)?$")
META_FILE = "meta.pt"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints (files or shard directories), oldest first."""
    paths = []
    for path in glob.glob(os.path.join(checkpoint_dir(run_dir), "step-*")):
        if not _NAME.search(path):
            continue
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, META_FILE)):
            continue
        paths.append(path)
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _prune(run_dir: str, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-max(1, keep)]:
        _remove(old)


def save_checkpoint(run_dir: str, state: dict, step: int, keep: int) -> str:
    """One file (DDP); called on rank 0 only."""
    os.makedirs(checkpoint_dir(run_dir), exist_ok=True)
    path = os.path.join(checkpoint_dir(run_dir), f"step-{step:08d}.pt")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save({CHECKPOINT_MARKER: 1, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        _remove(tmp)
        if getattr(err, "errno", None) != errno.ENOSPC and shutil.disk_usage(checkpoint_dir(run_dir)).free > 2**26:
            raise
        previous = (list_checkpoints(run_dir) or ["none"])[-1]
        raise KdscaleError(f"no space left on the device of {run_dir} while writing checkpoint {path}; the newest "
                           f"complete checkpoint ({previous}) is intact: free space (or lower "
                           f"train.keep_checkpoints) and run the same command again to resume") from None
    os.replace(tmp, path)
    _prune(run_dir, keep)
    return path


def save_sharded_checkpoint(run_dir: str, write_shards, meta: dict, step: int, keep: int, ctx) -> str:
    """A directory of shards (DeepSpeed); called on every rank. ``write_shards(dir)`` is
    the collective that writes each rank's part."""
    final = os.path.join(checkpoint_dir(run_dir), f"step-{step:08d}")
    tmp = f"{final}.tmp-{step}"  # every rank must name the same directory; the run lock keeps out other jobs
    if ctx.is_main:
        _remove(tmp)
        os.makedirs(tmp)
    ctx.barrier()
    write_shards(tmp)
    ctx.barrier()
    if ctx.is_main:
        torch.save({CHECKPOINT_MARKER: 1, **meta}, os.path.join(tmp, META_FILE))
        _remove(final)
        os.replace(tmp, final)
        _prune(run_dir, keep)
    ctx.barrier()
    return final


def remove_stale_temporaries(run_dir: str) -> None:
    """Delete half-written checkpoints of writers that were killed (call with the run lock held)."""
    for path in glob.glob(os.path.join(checkpoint_dir(run_dir), "step-*.tmp*")):
        _remove(path)


def load_latest_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """(path, state) of the newest readable checkpoint; for a shard directory the state is
    its metadata (the shards are loaded by the engine)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            file = os.path.join(path, META_FILE) if os.path.isdir(path) else path
            return path, torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file can fail in many ways
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
    return None


def consolidate_student(run_dir: str, network: str = "student") -> str:
    """The student of the run's newest checkpoint as one safetensors file, whatever wrote it:
    ZeRO shards of any number of processes are gathered offline (DeepSpeed's fp32
    reconstruction from the shards, plus the buffers kdscale keeps beside them). Written to
    ``<run>/export/step-<N>-student.safetensors``; loads as ``student.weights``. ``network``:
    another trained network of the method instead (``adaptors``: the ``features`` method's
    adaptor heads), written as ``step-<N>-<network>.safetensors``."""
    from safetensors.torch import save_file

    found = load_latest_checkpoint(run_dir)
    if found is None:
        raise KdscaleError(f"{run_dir}: no readable checkpoint in {checkpoint_dir(run_dir)}")
    path, state = found
    if os.path.isdir(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tags = sorted(t for t in os.listdir(path) if os.path.isdir(os.path.join(path, t)))
        model = {**state.get("buffers", {})}
        for tag in tags:  # one DeepSpeed engine per optimizer phase
            model.update(get_fp32_state_dict_from_zero_checkpoint(path, tag=tag))
    else:
        model = state["model"]
    prefix = f"{network}."
    student = {k.removeprefix(prefix): v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.items() if k.startswith(prefix)}
    if not student:
        held = sorted({k.split(".", 1)[0] for k in model})
        raise KdscaleError(f"checkpoint {path} holds no {network} network (it holds: {', '.join(held) or 'none'})")
    out = os.path.join(run_dir, "export", f"step-{state['step']:08d}-{network}.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(student, f"{out}.tmp-{os.getpid()}")
    os.replace(f"{out}.tmp-{os.getpid()}", out)
    return out


def _local_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's own device
    return state


def capture_rng_state(ctx=None) -> dict:
    """Every rank's own generator states (Python, CPU, its CUDA device), gathered: a collective
    when ``ctx`` is distributed. Each rank draws its own dropout masks, so each must get its
    own states back (:func:`restore_rng_state`)."""
    state = _local_rng_state()
    if ctx is None or not ctx.distributed:
        return {"per_rank": [state]}
    import torch.distributed as dist

    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return {"per_rank": gathered}


def restore_rng_state(state: dict, rank: int = 0, world_size: int = 1) -> None:
    """This rank's own states; on another world size rank ``r`` takes saved rank ``r mod n``
    (the data split restarts there anyway). Checkpoints of one shared state still load."""
    per_rank = state.get("per_rank") or [state]
    mine = per_rank[rank] if len(per_rank) == world_size else per_rank[rank % len(per_rank)]
    random.setstate(mine["python"])
    torch.set_rng_state(mine["torch"])
    cuda = mine.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # an older checkpoint: every device's state, from rank 0
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def seed_per_rank(seed: int, rank: int) -> None:
    """After the networks are built from one seed (identical initial weights on every rank),
    give each rank a generator stream of its own (dropout, drop-path): rank 0 keeps ``seed``."""
    torch.manual_seed(seed + 1_000_003 * rank)


def network_state(model_state: dict[str, torch.Tensor], network: str, where: str) -> dict[str, torch.Tensor]:
    """One network's weights from a checkpoint's ``model`` (``path.pt#network``; default student)."""
    prefix = network + "."
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        networks = sorted({k.split(".", 1)[0] for k in model_state})
        raise KdscaleError(f"{where}: checkpoint has no network {network!r}; it holds {', '.join(networks)} "
                           f"(select one with path#<network>)")
    return state


class Checkpointer:
    """A training run's checkpoints and export, in one place: what a checkpoint holds of the
    run (:meth:`save`), whether one may resume this run (:meth:`newest`: the same strategy;
    ZeRO shards on the same world size), putting it back (:meth:`restore`), and the
    student's export (:meth:`export`). The engine says how its networks are stored
    (``sharded_checkpoints``: one file by rank 0, or DeepSpeed's per-rank shards) and hands
    over its state (``checkpoint_state``, ``write_shards``, ``load_checkpoint``); the method
    hands over its per-sample state (``gathered_state``).

    It reads and sets these attributes of the trainer: ``step``, ``epoch``, ``batches_done``,
    ``last_metrics``, ``distiller``, ``window``, ``tracker``, ``watchdog``, ``sync_buffers()``.
    """

    def __init__(self, cfg, ctx, engine, strategy: str, resolved_config: dict):
        self.cfg, self.ctx, self.engine, self.strategy, self.resolved = cfg, ctx, engine, strategy, resolved_config
        self.run_dir, self.keep = cfg.run_dir, cfg.train.keep_checkpoints
        self.last_saved_step = -1

    # -- reading back -------------------------------------------------------------------
    @staticmethod
    def newest(run_dir: str, strategy: str, world_size: int, resumes_on_any_world_size: bool):
        """(path, metadata) of the newest readable checkpoint that this run may resume, None when
        there is none; one that belongs to another setup is refused in one line."""
        found = load_latest_checkpoint(run_dir)
        if found is None:
            return None
        path, state = found
        saved = state.get("strategy", "ddp")
        if saved != strategy:
            raise KdscaleError(f"checkpoint {path} was written under {saved}, this run uses {strategy}; resume "
                               f"with distributed.strategy={saved}, or start a new run (experiment.name) and take the "
                               f"weights from the old run's export/student.safetensors")
        if not resumes_on_any_world_size and state.get("world_size") != world_size:
            saved_world = state.get("world_size")
            raise KdscaleError(f"checkpoint {path} holds ZeRO shards of {saved_world} processes: resume on "
                               f"{saved_world} processes, or carry its student to {world_size} (the optimizer state "
                               f"and schedule restart): `kdscale checkpoint consolidate {run_dir}`, then a new run "
                               f"(experiment.name) with the student.weights it prints")
        return found

    @staticmethod
    def keep_global_batch(cfg, path: str, state: dict, world_size: int) -> None:
        """A run resumed on another number of processes keeps its global batch (and so its
        steps per epoch and its schedule): ``train.grad_accum_steps`` is set so that
        ``data.batch_size x world size x accumulation`` equals the checkpoint's; where no whole
        accumulation does, the resume is refused in one line naming settings that do."""
        saved_world = state.get("world_size", world_size)
        saved = state.get("config") or {}
        saved_batch = saved.get("data", {}).get("batch_size", cfg.data.batch_size)
        saved_accum = saved.get("train", {}).get("grad_accum_steps", cfg.train.grad_accum_steps)
        global_batch = saved_batch * saved_accum * saved_world
        per_step = cfg.data.batch_size * world_size
        if per_step * cfg.train.grad_accum_steps == global_batch:
            return
        if global_batch % per_step:
            hint = next((f"data.batch_size={b} train.grad_accum_steps={global_batch // (b * world_size)}"
                         for b in range(cfg.data.batch_size, 0, -1) if global_batch % (b * world_size) == 0), None)
            fix = f"set {hint}" if hint else f"resume on {saved_world} processes"
            raise KdscaleError(f"checkpoint {path} was trained with a global batch of {global_batch} "
                               f"({saved_batch} x {saved_world} processes x {saved_accum} accumulation); no whole "
                               f"train.grad_accum_steps keeps it with data.batch_size={cfg.data.batch_size} on "
                               f"{world_size} processes: {fix}, or start a new run (experiment.name)")
        accum = global_batch // per_step
        log.info(f"resuming a {saved_world}-process run on {world_size} processes: train.grad_accum_steps "
                 f"{cfg.train.grad_accum_steps} -> {accum} keeps its global batch of {global_batch}")
        cfg.train.grad_accum_steps = accum

    def restore(self, trainer, path: str, state: dict) -> str | None:
        """Put the run back as it was at ``path``; returns the wandb run id to continue."""
        try:
            self.engine.load_checkpoint(path, state)
        except (RuntimeError, KeyError) as err:
            raise KdscaleError(f"checkpoint {path} does not fit this config's networks "
                               f"({str(err).splitlines()[0]}); use another experiment.name or train.resume=false") from None
        trainer.step, trainer.epoch, trainer.batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        trainer.last_metrics = dict(state.get("metrics", {}))
        self.last_saved_step = trainer.step
        world = self.ctx.world_size
        if state.get("world_size") != world:  # the same global batch (keep_global_batch): the same step in the epoch
            saved_accum = (state.get("config") or {}).get("train", {}).get("grad_accum_steps", 1)
            trainer.batches_done = trainer.batches_done // saved_accum * self.cfg.train.grad_accum_steps
            log.info(f"resuming a {state.get('world_size')}-process run on {world} processes at the same step of "
                     f"epoch {trainer.epoch}: its remaining batches come from the new split of the shards over "
                     f"{world} processes (the order differs from an uninterrupted run)")
        if state.get("method_state") is not None:
            trainer.distiller.restore_gathered_state(state["method_state"])
        trainer.window.restore(state.get("metrics_window"), self.ctx.rank, world, self.ctx.device)
        restore_rng_state(state["rng"], self.ctx.rank, world)
        log.info(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch}, batch {trainer.batches_done})")
        return state.get("wandb_run_id")

    # -- writing ------------------------------------------------------------------------
    def save(self, trainer) -> None:
        """A checkpoint at the trainer's step (a collective; once per step)."""
        if trainer.step == self.last_saved_step:
            return
        with trainer.watchdog.waiting("writing a checkpoint"):
            trainer.sync_buffers()
            meta = {"step": trainer.step, "epoch": trainer.epoch, "batches_in_epoch": trainer.batches_done,
                    "rng": capture_rng_state(self.ctx), "wandb_run_id": trainer.tracker.run_id,
                    "config": self.resolved, "world_size": self.ctx.world_size, "strategy": self.strategy,
                    "metrics": trainer.last_metrics, "method_state": trainer.distiller.gathered_state(),
                    "metrics_window": trainer.window.state(self.ctx), **self.engine.checkpoint_state()}
            if self.engine.sharded_checkpoints:
                save_sharded_checkpoint(self.run_dir, self.engine.write_shards, meta, trainer.step, self.keep, self.ctx)
            else:  # every rank holds the same weights: rank 0 writes one file
                if self.ctx.is_main:
                    save_checkpoint(self.run_dir, meta, trainer.step, self.keep)
                self.ctx.barrier()
        trainer.watchdog.progress()
        self.last_saved_step = trainer.step

    def export(self, student_state: dict) -> str:
        """The student alone, as safetensors (loadable into the plain model); rank 0."""
        from safetensors.torch import save_file

        path = os.path.join(self.run_dir, "export", "student.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(student_state, f"{path}.tmp-{os.getpid()}")
        os.replace(f"{path}.tmp-{os.getpid()}", path)
        return path
