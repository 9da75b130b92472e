"""Eager PyTorch references: full logits, plain autograd. Same signatures and outputs as the fused code."""
from .logprobs import fused_logprobs
from .modules import (FusedAlphaDPOLoss, FusedCPOLoss, FusedDPOLoss, FusedDPOPLoss, FusedIPOLoss, FusedKTOLoss,
                      FusedMCPOLoss, FusedORPOLoss, FusedSimPOLoss, FusedSLiCLoss, FusedSPOLoss, FusedVARLoss,
                      var_cross_pair_ref_logps)

__all__ = [
    "fused_logprobs",
    "FusedDPOLoss", "FusedIPOLoss", "FusedSimPOLoss", "FusedSLiCLoss", "FusedDPOPLoss", "FusedKTOLoss",
    "FusedORPOLoss", "FusedCPOLoss", "FusedVARLoss", "FusedAlphaDPOLoss", "FusedMCPOLoss", "FusedSPOLoss",
    "var_cross_pair_ref_logps",
]
