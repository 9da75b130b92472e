"""fastpref: fused preference-optimization losses that never materialize the logits."""
from . import losses
from ._stats import LogprobStats
from .ops import fused_logprobs

__version__ = "0.1.0"

__all__ = ["LogprobStats", "fused_logprobs", "__version__"]
