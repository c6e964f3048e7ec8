"""Load an experiment config: YAML file + dotted command-line overrides -> typed schema.

Validation is strict: an unknown key names the nearest valid one, a value of the wrong
type names the expected type, a value out of its declared range (:mod:`kdscale.config.ranges`)
names the range, and all name where the key came from (the YAML file or the command line).
YAML is read with ``safe_load`` only: configs never execute code.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from kdscale.config.ranges import check_range
from kdscale.config.schema import ExperimentConfig, MethodSection
from kdscale.errors import KdscaleError


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read ``path`` (may be None for overrides only), apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise KdscaleError(f"config file not found: {path} (pass an existing YAML file to --config)")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as err:
                raise KdscaleError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise KdscaleError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    override_keys = set()
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        override_keys.add(re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key))  # teachers.1.x is teachers[1].x
    source = _Source(path or "<no file>", override_keys)
    return _resolved(build_dataclass(ExperimentConfig, raw, "", source), source)


def _resolved(cfg: ExperimentConfig, source: _Source) -> ExperimentConfig:
    from kdscale.config.teachers import resolve_teachers

    resolve_teachers(cfg, source.where)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise KdscaleError(f"command-line override {item!r} must look like key.sub=value (e.g. optim.lr=0.1)")
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise KdscaleError(f"command-line override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in the raw config; a number indexes a list (``teachers.1.weights``)."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KdscaleError(f"command-line override {dotted}: {'.'.join(parts[:depth])} is a list of "
                                   f"{len(node)}; {part!r} is not an index into it (0 to {len(node) - 1})")
            part = int(part)
        elif not isinstance(node, dict):
            raise KdscaleError(f"command-line override {dotted}: {'.'.join(parts[:depth])} is a value, not a section")
        if depth == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part) if isinstance(node, dict) else node[part]
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise KdscaleError(f"command-line override {dotted}: {prefix} is a value, not a section")
        node = child


class _Source:
    """Says where a key came from, for error messages."""

    def __init__(self, path: str, override_keys: set[str]):
        self.path = path
        self.override_keys = override_keys

    def where(self, key: str) -> str:
        if any(k == key or k.startswith(key + ".") for k in self.override_keys):
            return f"command-line override {key}"
        return f"{self.path}: {key}"


def build_dataclass(cls: type, raw: Any, prefix: str, source: _Source) -> Any:
    if not isinstance(raw, dict):
        raise KdscaleError(f"{source.where(prefix.rstrip('.'))}: expected a mapping (section), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise KdscaleError(_unknown_key_message(full, key, names, prefix, source))
        if cls is ExperimentConfig and key == "method":
            kwargs[key] = build_method_section(value, source)
        else:
            kwargs[key] = coerce(hints[key], value, full, source)
            optional = type(None) in typing.get_args(hints[key])
            check_range(fields[key].metadata, kwargs[key], value, source.where(full), optional)
    return cls(**kwargs)


def build_method_section(raw: Any, source: _Source) -> MethodSection:
    from kdscale.methods import get_method_class

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KdscaleError(f"{source.where('method')}: expected a mapping with at least 'name', got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name", "vanilla")
    feature_teacher = raw.pop("feature_teacher", None)
    if feature_teacher is not None and not isinstance(feature_teacher, str):
        raise KdscaleError(f"{source.where('method.feature_teacher')}: expected a teacher id, got {feature_teacher!r}")
    if not isinstance(name, str):
        raise KdscaleError(f"{source.where('method.name')}: expected a method name, got {name!r}")
    method_cls = get_method_class(name, where=source.where("method.name"))
    params = build_dataclass(method_cls.Params, raw, "method.", source)
    return MethodSection(name=name, feature_teacher=feature_teacher, params=params)


def _unknown_key_message(full: str, key: str, names: list[str], prefix: str, source: _Source) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(names)}"
    return f"{source.where(full)}: unknown key{hint}"


def coerce(hint: Any, value: Any, key: str, source: _Source) -> Any:
    """Check ``value`` against the type ``hint`` (converting int->float and numeric strings)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise KdscaleError(f"{source.where(key)}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise KdscaleError(f"{source.where(key)}: expected a list, got {value!r}")
        return [coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise KdscaleError(f"{source.where(key)}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, {} if value is None else value, key + ".", source)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads "1e-3" as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported schema type {hint!r} for {key}")
    raise KdscaleError(f"{source.where(key)}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")


def config_to_dict(cfg: Any) -> Any:
    """The resolved config as plain YAML-able data (method params flattened into ``method``)."""
    if isinstance(cfg, MethodSection):
        out = {"name": cfg.name}
        if cfg.feature_teacher is not None:
            out["feature_teacher"] = cfg.feature_teacher
        if cfg.params is not None:
            out.update(config_to_dict(cfg.params))
        return out
    if dataclasses.is_dataclass(cfg):  # ``teacher`` is input only: resolved into ``teachers``
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if not (isinstance(cfg, ExperimentConfig) and f.name == "teacher")}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config saved with :func:`config_to_dict` (e.g. from a checkpoint)."""
    source = _Source("<checkpoint config>", set())
    return _resolved(build_dataclass(ExperimentConfig, data, "", source), source)


def format_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
