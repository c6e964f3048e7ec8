"""Experiment configuration: typed schema and YAML/override loader."""

from kdscale.config.loader import (
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
)
from kdscale.config.schema import ExperimentConfig, ModelSpec, TeacherSpec

__all__ = [
    "ExperimentConfig",
    "ModelSpec",
    "TeacherSpec",
    "config_from_dict",
    "config_to_dict",
    "format_config",
    "load_config",
]
