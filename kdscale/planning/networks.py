"""The networks ``kdscale plan`` counts, built as the trainer builds them (on CPU, random
weights of the same sizes, each teacher replicated), and the run's training-sample count."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.config.teachers import teacher_key
from kdscale.errors import KdscaleError
from kdscale.planning.activations import PROBE_BATCHES


def planned_precision(cfg: ExperimentConfig) -> str:
    return "fp32" if cfg.train.precision in ("fp32", "tf32") else "bf16"  # auto: bf16 on a GPU


def without_weights(cfg: ExperimentConfig, spec, key: str):
    """A teacher entry with random weights of the same sizes, replicated, keeping the input size,
    mean and std its hub weights would give (a timm tag's pretrained_cfg: DINOv2 is 518 px)."""
    from kdscale.models.preprocessing import network_preprocessing, pretrained_preprocessing

    fields = {}
    if pretrained_preprocessing(spec.name, spec.weights, key) is not None:
        pre = network_preprocessing(cfg.data, spec, key)
        side = pre.input_size[0] if pre.input_size[0] == pre.input_size[1] else spec.input_size
        fields = {"input_size": side, "mean": list(pre.mean), "std": list(pre.std)}
    return dataclasses.replace(spec, weights=None, sharding="replicated", **fields)


def build_networks(cfg: ExperimentConfig):
    """The Distiller and the online frozen teachers (by id) as the trainer builds them (on CPU,
    each replicated; random weights, same sizes and inputs)."""
    from kdscale.runtime.device import Runtime
    from kdscale.train.setup import build_distiller

    spec = dataclasses.replace
    cfg = spec(cfg, student=spec(cfg.student, weights=None),
               teachers=[without_weights(cfg, t, teacher_key(cfg, t)) for t in cfg.teachers],
               distributed=spec(cfg.distributed, teacher_sharding="replicated"))
    autocast_dtype = torch.bfloat16 if planned_precision(cfg) == "bf16" else None
    torch.manual_seed(cfg.experiment.seed)
    with warnings.catch_warnings():  # "teachers[i].weights is not set": dropped on purpose
        warnings.simplefilter("ignore")
        labels = torch.arange(PROBE_BATCHES[-1]) % cfg.data.num_classes  # per-sample state (CRD) at probe size
        distiller, frozen = build_distiller(cfg, Runtime(torch.device("cpu"), autocast_dtype, False), world_size=1,
                                            train_labels=labels)
    return distiller.train(), frozen, autocast_dtype


def training_samples(cfg: ExperimentConfig) -> int:
    """``data.train_samples``, else the count in the shards' ``index.json``."""
    from kdscale.data.shards import expand_shards, samples_from_index

    if cfg.data.train_samples:
        return cfg.data.train_samples
    count = samples_from_index(expand_shards(cfg.data.train_shards, "data.train_shards"), "train")
    if not count:
        raise KdscaleError(f"method {cfg.method.name!r} keeps state per training sample: set data.train_samples")
    return count
