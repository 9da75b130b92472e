"""Eager twins of the fused loss modules: same class names, signatures and outputs, full logits.

Each class subclasses its fused counterpart in :mod:`fastpref.modules` and swaps only the log-prob op
for the eager :func:`fastpref.reference.fused_logprobs` (plain autograd through the full
``[positions x vocab]`` logits), so every difference between the two is the fused op's.
"""
from __future__ import annotations

import functools

from .. import modules as _fused
from .logprobs import fused_logprobs as _eager_logprobs


def _eager_twin(cls: type) -> type:
    attrs = {
        "fused_logprobs": staticmethod(_eager_logprobs),
        "__module__": __name__,
        "__doc__": f"Eager reference of :class:`fastpref.{cls.__name__}` (full logits, plain autograd).\n\n"
                   + (cls.__doc__ or ""),
    }
    return type(cls.__name__, (cls,), attrs)


FusedDPOLoss = _eager_twin(_fused.FusedDPOLoss)
FusedIPOLoss = _eager_twin(_fused.FusedIPOLoss)
FusedSimPOLoss = _eager_twin(_fused.FusedSimPOLoss)
FusedSLiCLoss = _eager_twin(_fused.FusedSLiCLoss)
FusedDPOPLoss = _eager_twin(_fused.FusedDPOPLoss)
FusedKTOLoss = _eager_twin(_fused.FusedKTOLoss)
FusedORPOLoss = _eager_twin(_fused.FusedORPOLoss)
FusedCPOLoss = _eager_twin(_fused.FusedCPOLoss)
FusedVARLoss = _eager_twin(_fused.FusedVARLoss)
FusedAlphaDPOLoss = _eager_twin(_fused.FusedAlphaDPOLoss)
FusedMCPOLoss = _eager_twin(_fused.FusedMCPOLoss)
FusedSPOLoss = _eager_twin(_fused.FusedSPOLoss)

#: Eager twin of :func:`fastpref.var_cross_pair_ref_logps`.
var_cross_pair_ref_logps = functools.partial(_fused.var_cross_pair_ref_logps, logprobs_fn=_eager_logprobs)

LOSS_MODULES = [
    "FusedDPOLoss", "FusedIPOLoss", "FusedSimPOLoss", "FusedSLiCLoss", "FusedDPOPLoss", "FusedKTOLoss",
    "FusedORPOLoss", "FusedCPOLoss", "FusedVARLoss", "FusedAlphaDPOLoss", "FusedMCPOLoss", "FusedSPOLoss",
]
__all__ = LOSS_MODULES + ["var_cross_pair_ref_logps"]
