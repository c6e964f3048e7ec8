"""Declarative value ranges for config keys.

A dataclass field of the schema, or of a method's ``Params``, declares its range in its
metadata; the loader checks every value it reads against it, so a zero batch size or a
negative temperature is a one-line error before anything starts, not a traceback later::

    batch_size: int = field(default=64, metadata={"ge": 1, "what": "the per-process batch size"})
    temperature: float = field(default=4.0, metadata={"gt": 0})

Bounds: ``ge`` (>=), ``gt`` (>), ``le`` (<=), ``lt`` (<); ``what`` says what the key is
(shown in the error). For a list the bounds apply to each element. ``None`` passes where
the type allows it (it means "unset"). A float must also be finite. :func:`ranged` is
shorthand for such a field.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from kdscale.errors import KdscaleError

_BOUNDS: tuple[tuple[str, str, Callable[[Any, Any], bool]], ...] = (
    ("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def ranged(default: Any, what: str = "", *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with ``default`` whose values must lie in the given bounds."""
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    return dataclasses.field(default=default, metadata={**bounds, "what": what})


def has_range(meta: Mapping[str, Any]) -> bool:
    return any(name in meta for name, _, _ in _BOUNDS)


def describe(meta: Mapping[str, Any], optional: bool = False) -> str:
    """The allowed values in words: ``>= 1``, ``in [0, 1)``, ``> 0 or null``."""
    lower = next(((sym, meta[n]) for n, sym, _ in _BOUNDS[:2] if n in meta), None)
    upper = next(((sym, meta[n]) for n, sym, _ in _BOUNDS[2:] if n in meta), None)
    if lower and upper:
        left, right = "[" if lower[0] == ">=" else "(", "]" if upper[0] == "<=" else ")"
        text = f"in {left}{_num(lower[1])}, {_num(upper[1])}{right}"
    else:
        sym, bound = lower or upper  # type: ignore[misc]
        text = f"{sym} {_num(bound)}"
    return text + (" or null" if optional else "")


def out_of_range(meta: Mapping[str, Any], value: Any) -> bool:
    """Whether ``value`` (not None) breaks the bounds in ``meta``; NaN and infinities always do."""
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return not all(test(value, meta[name]) for name, _, test in _BOUNDS if name in meta)


def check_range(meta: Mapping[str, Any], value: Any, shown: Any, where: str, optional: bool = False) -> None:
    """Raise a one-line :class:`KdscaleError` if ``value`` (or an element of it) is out of range.

    ``where`` names the key (and its source); ``shown`` is the value as the user wrote it.
    """
    if value is None or not has_range(meta):
        return
    if isinstance(value, (list, tuple)):
        shown_items = shown if isinstance(shown, (list, tuple)) and len(shown) == len(value) else value
        for i, (item, raw) in enumerate(zip(value, shown_items)):
            check_range(meta, item, raw, f"{where}[{i}]")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not out_of_range(meta, value):
        return
    finite = "" if not isinstance(value, float) or math.isfinite(value) else "a finite number "
    what = f" ({meta['what']})" if meta.get("what") else ""
    raise KdscaleError(f"{where}={_show(shown)}: must be {finite}{describe(meta, optional)}{what}")


def _num(bound: Any) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _show(value: Any) -> str:
    if isinstance(value, str) or value is None:
        return str(value)
    return repr(value)
