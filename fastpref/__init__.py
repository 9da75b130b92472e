"""fastpref: fused preference-optimization losses that never materialize the logits.

The loss modules (``fastpref.FusedDPOLoss`` ... ``fastpref.FusedSPOLoss``) are the classes of the one
registry :data:`fastpref.modules.LOSS_MODULES`, exported here under their class names.
"""
from . import losses
from ._types import KernelOptions, LogprobStats
from .modules import LOSS_MODULES as _LOSS_MODULES
from .modules import LossOutput, var_cross_pair_ref_logps
from .ops import fused_logprobs

globals().update(_LOSS_MODULES)

__version__ = "0.1.0"

__all__ = [
    "KernelOptions", "LogprobStats", "fused_logprobs", "losses", "__version__", "LossOutput", *_LOSS_MODULES,
    "var_cross_pair_ref_logps",
]
