"""Run tracking: wandb on rank 0, plus a local ``metrics.jsonl`` that survives anything.

wandb mode: ``wandb.mode`` from the config; under ``auto``, ``WANDB_MODE`` if set, else
online when an API key is configured (``WANDB_API_KEY`` or a netrc entry), else offline.
An online run that cannot start falls back to offline with a warning: training never
blocks on wandb. The run id is kept in checkpoints so a resumed job continues the run.

The wandb config and summary carry the run's keys at the top level (:func:`run_keys`:
``method`` (as papers name it, ``kd+ls`` for KD with logit standardization), ``seed``,
``student``, ``teacher``, ``dataset``) so a dashboard can group
runs by method and average over seeds with no editing; the config sections of the same
names follow as ``method_config``, ``student_config`` (the ``teachers`` section keeps its name)
(:func:`run_config`). A training run also writes that config to ``run.json`` beside
``metrics.jsonl``, so ``kdscale compare`` knows a run tracked without wandb.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets

from kdscale.config.schema import ExperimentConfig
from kdscale.lifecycle.helpers import without_stop_signals
from kdscale.log import log


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(configured: str) -> str:
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_api_key() else "offline"


def run_tags(cfg: ExperimentConfig) -> list[str]:
    from kdscale.methods import get_method_class

    paper = get_method_class(cfg.method.name).paper
    tags = [f"method:{cfg.method.name}", f"paper:{paper}"[:64], f"dataset:{cfg.experiment.dataset}",
            f"student:{cfg.student.name}"]
    tags += [f"teacher:{spec.name}" for spec in cfg.teachers]
    return tags + list(cfg.wandb.tags)


def method_label(cfg: ExperimentConfig) -> str:
    """The method as papers' tables name it: ``method.name``, with ``+ls`` where it
    standardizes logits (``kd+ls``, ``dkd+ls``: Sun et al. 2024), a row of its own."""
    standardized = getattr(cfg.method.params, "logit_standardization", False)
    return f"{cfg.method.name}+ls" if standardized else cfg.method.name


def run_keys(cfg: ExperimentConfig) -> dict:
    """The keys runs are grouped and averaged by (``teacher``: the teachers' names joined by
    ``+``, None for a run without one)."""
    return {"method": method_label(cfg), "seed": cfg.experiment.seed, "student": cfg.student.name,
            "teacher": "+".join(spec.name for spec in cfg.teachers) or None, "dataset": cfg.experiment.dataset}


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_config(cfg: ExperimentConfig, resolved_config: dict, world_size: int | None = None) -> dict:
    """The config wandb records: :func:`run_keys`, the processes and global batch (images per
    optimizer step), then every config section, those whose names the keys take renamed
    ``<section>_config``."""
    keys = run_keys(cfg)
    world = world_size or _world_size()
    sections = {(f"{name}_config" if name in keys else name): value for name, value in resolved_config.items()}
    return {**keys, "world_size": world,
            "global_batch": cfg.data.batch_size * world * cfg.train.grad_accum_steps, **sections}


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


class Tracker:
    """Logs on the main process only; other ranks get a no-op tracker."""

    def __init__(self, cfg: ExperimentConfig, resolved_config: dict, run_id: str | None, is_main: bool,
                 job_type: str = "train"):
        self.is_main = is_main
        self.run = None
        self.mode = resolve_wandb_mode(cfg.wandb.mode)
        self.run_dir = cfg.run_dir
        self.run_id = run_id
        if not is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a")
        config = run_config(cfg, resolved_config)
        if self.mode != "disabled":
            self.run_id = run_id or secrets.token_hex(4)
        if job_type == "train":
            _write_json(os.path.join(self.run_dir, "run.json"), {**config, "wandb_run_id": self.run_id})
        if self.mode == "disabled":
            return
        import wandb

        kwargs = dict(project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.experiment.name,
                      job_type=job_type, name=cfg.experiment.name if job_type == "train" else f"{cfg.experiment.name}-{job_type}",
                      tags=run_tags(cfg), config=config, dir=self.run_dir, id=self.run_id, resume="allow",
                      settings=wandb.Settings(init_timeout=cfg.wandb.init_timeout_s))
        try:
            with without_stop_signals():  # its service must outlive a signal to every process of the job
                self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as err:  # noqa: BLE001 - bad key, unreachable server, ...
            if self.mode != "online":
                raise
            log.warning(f"wandb could not start online ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                        f"logging offline instead; sync later with `wandb sync`")
            self.mode = "offline"
            # The failed attempt keeps the id busy in wandb's service: the offline run gets its own.
            self.run_id = kwargs["id"] = secrets.token_hex(4)
            with without_stop_signals():
                self.run = wandb.init(mode="offline", **kwargs)
            if job_type == "train":
                _write_json(os.path.join(self.run_dir, "run.json"), {**config, "wandb_run_id": self.run_id})
        self.run.summary.update(run_keys(cfg))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001 - wandb's service is gone (a signal to every process)
                self._lost(err)

    def _lost(self, err: BaseException) -> None:
        """wandb's service stopped answering (``scancel`` signals every process of a job, the
        service too): say so once and go on without it; metrics.jsonl keeps every step."""
        detail = (str(err).splitlines() or [""])[0][:200]
        hint = f" ({self.sync_hint()})" if self.sync_hint() else ""
        log.warning(f"wandb stopped answering ({type(err).__name__}: {detail}); metrics.jsonl keeps the whole "
                    f"history, and the wandb run keeps what reached it{hint}")
        self.run = None

    def sync_hint(self) -> str | None:
        if self.mode != "offline" or self.run_id is None:
            return None
        return f"wandb sync {os.path.join(self.run_dir, 'wandb', f'offline-run-*-{self.run_id}')}"

    def finish(self, failed: bool = False) -> None:
        """Flush and close (idempotent); a failed run is marked so in wandb (exit code 1)."""
        if not self.is_main:
            return
        if not self._jsonl.closed:
            self._jsonl.close()
        if self.run is not None:
            try:
                self.run.finish(exit_code=1 if failed else 0)
            except Exception as err:  # noqa: BLE001 - its service is gone: the offline files stay as written
                self._lost(err)
            self.run = None
