"""Argument checks shared by the op, the loss heads and the modules: each error names the argument."""
from __future__ import annotations

import math
import operator
from typing import Optional, Union

Number = Union[float, int]


def check_positive(name: str, value: Number, *, allow_zero: bool = False) -> float:
    """A finite number that must be > 0 (or >= 0 with ``allow_zero``), as a float."""
    v = _as_float(name, value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return v


def check_optional_positive(name: str, value: Optional[Number]) -> Optional[float]:
    """``None``, or a finite number > 0."""
    return None if value is None else check_positive(name, value)


def check_finite(name: str, value: Number) -> float:
    """Any finite number, as a float."""
    v = _as_float(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    return v


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    """An integer (Python, NumPy or 0-d integer tensor); floats such as 2.7 are refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v}")
    return v


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
