"""Eager twins of the fused loss modules: same class names, signatures and outputs, full logits.

One twin per entry of :data:`fastpref.modules.LOSS_MODULES`: each subclasses its fused counterpart and
swaps only the log-prob op for the eager :func:`fastpref.reference.fused_logprobs` (plain autograd
through the full ``[positions x vocab]`` logits), so every difference between the two is the fused op's.
"""
from __future__ import annotations

import functools
from typing import Dict, Type

from ..modules import LOSS_MODULES as _FUSED
from ..modules import FusedLossBase
from ..modules import var_cross_pair_ref_logps as _fused_var_cross_pair_ref_logps
from .logprobs import fused_logprobs as _eager_logprobs


def _eager_twin(cls: Type[FusedLossBase]) -> Type[FusedLossBase]:
    attrs = {
        "fused_logprobs": staticmethod(_eager_logprobs),
        "__module__": __name__,
        "__qualname__": cls.__name__,
        "__doc__": f"Eager reference of :class:`fastpref.{cls.__name__}` (full logits, plain autograd).\n\n"
                   + (cls.__doc__ or ""),
    }
    return type(cls.__name__, (cls,), attrs)


#: The eager twins, class name -> class, in the order of :data:`fastpref.modules.LOSS_MODULES`.
LOSS_MODULES: Dict[str, Type[FusedLossBase]] = {name: _eager_twin(cls) for name, cls in _FUSED.items()}
globals().update(LOSS_MODULES)

#: Eager twin of :func:`fastpref.var_cross_pair_ref_logps`.
var_cross_pair_ref_logps = functools.partial(_fused_var_cross_pair_ref_logps, logprobs_fn=_eager_logprobs)

__all__ = [*LOSS_MODULES, "var_cross_pair_ref_logps"]
