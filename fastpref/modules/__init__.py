"""Fused loss modules (docs/api.md §3): drop-in ``torch.nn.Module`` losses for preference trainers.

Split by family: :mod:`.base` (the call shape, :class:`LMHead`, :class:`FusedLossBase`, the layouts),
:mod:`.batch_stats` (statistics over ranks), :mod:`.pairwise` (DPO, IPO, SimPO, SLiC, DPOP, ORPO, CPO,
alpha-DPO), :mod:`.kto`, :mod:`.var` (with :func:`var_cross_pair_ref_logps`), :mod:`.mcpo` and
:mod:`.spo`.

:data:`LOSS_MODULES` is the one registry of the loss modules, name -> class, in a fixed order;
``fastpref``, ``fastpref.reference`` (the eager twins), ``fastpref check`` and the TRL integration
all read it. Adding a loss means adding its class here and nowhere else.
"""
from __future__ import annotations

from typing import Dict, Type

from .base import FusedLossBase, LMHead, LossOutput, SequenceBatch
from .batch_stats import gather_across_ranks, global_mean
from .kto import FusedKTOLoss
from .mcpo import FusedMCPOLoss
from .pairwise import (
    FusedAlphaDPOLoss,
    FusedCPOLoss,
    FusedDPOLoss,
    FusedDPOPLoss,
    FusedIPOLoss,
    FusedORPOLoss,
    FusedSimPOLoss,
    FusedSLiCLoss,
)
from .spo import FusedSPOLoss
from .var import FusedVARLoss, var_cross_pair_ref_logps

#: The loss modules, class name -> class, in the documented order (docs/api.md §3.3).
LOSS_MODULES: Dict[str, Type[FusedLossBase]] = {
    cls.__name__: cls
    for cls in (
        FusedDPOLoss, FusedIPOLoss, FusedSimPOLoss, FusedSLiCLoss, FusedDPOPLoss, FusedKTOLoss,
        FusedORPOLoss, FusedCPOLoss, FusedVARLoss, FusedAlphaDPOLoss, FusedMCPOLoss, FusedSPOLoss,
    )
}

__all__ = [
    "LOSS_MODULES", "LossOutput", "LMHead", "FusedLossBase", "SequenceBatch", *LOSS_MODULES,
    "var_cross_pair_ref_logps", "gather_across_ranks", "global_mean",
]
