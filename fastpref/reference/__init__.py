"""Eager PyTorch references: full logits, plain autograd. Same signatures and outputs as the fused code."""
from .logprobs import fused_logprobs

__all__ = ["fused_logprobs"]
