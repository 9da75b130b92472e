"""Argument checks shared by the op, the loss heads and the modules: each error names the argument.

Checks of Python scalars raise at once. Checks of tensor values go through :func:`check_values`, which
raises on the host for CPU tensors and asserts on the device (no synchronization) elsewhere.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Callable, Optional, Union

import torch

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


#: Set to 1 to make value checks on accelerator tensors synchronize and raise the precise ``ValueError``
#: (as on CPU) instead of a device-side assertion.
SYNC_CHECKS_ENV = "FASTPREF_SYNC_CHECKS"


def sync_checks_requested() -> bool:
    """True when ``FASTPREF_SYNC_CHECKS=1`` asks for host-side (synchronizing) value checks everywhere."""
    return os.environ.get(SYNC_CHECKS_ENV, "") == "1"


def check_values(ok: torch.Tensor, message: str, detail: Optional[Callable[[], str]] = None) -> None:
    """The one check on tensor *values* (as opposed to shapes/dtypes): ``ok`` must be True everywhere.

    - CPU tensors, or ``FASTPREF_SYNC_CHECKS=1``: read back on the host and raise ``ValueError(message +
      detail())``, ``detail`` (optional) saying which value was wrong.
    - Other devices (CUDA ...), and any tensor while ``torch.compile`` traces: ``torch._assert_async`` on
      the device, so the check never synchronizes (nor breaks a graph); a failure surfaces at the next
      synchronization as a device-side assertion carrying ``message``.
    - meta tensors hold no values: nothing to check.
    """
    if ok.device.type == "meta":
        return
    tracing = torch.compiler.is_compiling()
    if not tracing and (ok.device.type == "cpu" or sync_checks_requested()):
        if not bool(ok.all()):
            raise ValueError(message + (detail() if detail is not None else ""))
        return
    torch._assert_async(ok.all(), message)
