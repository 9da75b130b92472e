"""Eager PyTorch references: full logits, plain autograd. Same signatures and outputs as the fused code.

``fused_logprobs`` is the eager twin of :func:`fastpref.fused_logprobs`; every loss module of
:data:`fastpref.modules.LOSS_MODULES` has an eager twin here under the same class name.
"""
from .logprobs import fused_logprobs
from .modules import LOSS_MODULES as _LOSS_MODULES
from .modules import var_cross_pair_ref_logps

globals().update(_LOSS_MODULES)

__all__ = ["fused_logprobs", *_LOSS_MODULES, "var_cross_pair_ref_logps"]
