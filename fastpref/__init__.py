"""fastpref: fused preference-optimization losses that never materialize the logits."""
from . import losses
from ._types import LogprobStats
from .ops import fused_logprobs
from .modules import (FusedAlphaDPOLoss, FusedCPOLoss, FusedDPOLoss, FusedDPOPLoss, FusedIPOLoss, FusedKTOLoss,
                      FusedMCPOLoss, FusedORPOLoss, FusedSimPOLoss, FusedSLiCLoss, FusedSPOLoss, FusedVARLoss,
                      LossOutput, var_cross_pair_ref_logps)

__version__ = "0.1.0"

__all__ = [
    "LogprobStats", "fused_logprobs", "losses", "__version__",
    "LossOutput", "FusedDPOLoss", "FusedIPOLoss", "FusedSimPOLoss", "FusedSLiCLoss", "FusedDPOPLoss",
    "FusedKTOLoss", "FusedORPOLoss", "FusedCPOLoss", "FusedVARLoss", "FusedAlphaDPOLoss", "FusedMCPOLoss",
    "FusedSPOLoss", "var_cross_pair_ref_logps",
]
