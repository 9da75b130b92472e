"""Loss heads: short pure functions of per-sequence statistics (docs/api.md §2, docs/losses.md).

Each takes the statistics produced by :func:`fastpref.fused_logprobs` (summed policy log-probs with
grad; reference log-probs, lengths, rewards and batch statistics as constants) and returns
``(loss, metrics)``: a scalar loss averaged over examples and a dict of detached tensors. Math runs
in float32, or float64 when given float64.
"""
from .alpha_dpo import alpha_dpo, alpha_dpo_margin
from .dpo_family import (
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    check_dpo_options,
    chosen_nll,
    dpo_family,
    f_divergence_scores,
    ld_logps,
    per_sequence_sums,
    wpo_sequence_weights,
)
from .kto import kto, kto_z0
from .mcpo import mcpo, mcpo_sample_negatives
from .pairwise import cpo, dpo, dpop, ipo, orpo, simpo, slic
from .spo import spo, spo_best_of_n, spo_ranked, spo_weight_baseline
from .var import var

__all__ = [
    "var", "alpha_dpo", "alpha_dpo_margin", "mcpo", "mcpo_sample_negatives", "spo", "spo_best_of_n",
    "spo_ranked", "spo_weight_baseline", "dpo", "ipo", "simpo", "slic", "dpop", "kto", "kto_z0", "orpo", "cpo",
    "dpo_family", "DPO_LOSS_TYPES", "F_DIVERGENCES", "f_divergence_scores", "chosen_nll", "wpo_sequence_weights",
    "ld_logps", "per_sequence_sums", "check_dpo_options",
]
