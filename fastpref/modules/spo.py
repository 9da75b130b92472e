"""SPO, fused (docs/api.md §3, docs/losses.md §5): a reference-free preference term plus a
full-vocabulary KL regularizer on online samples, which a second fused pass computes."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import losses
from .._checks import check_int, check_positive
from .base import FusedLossBase, Metrics, SequenceBatch, Tensor, check_grouped, check_pairwise, split_pairs
from .batch_stats import is_distributed


class FusedSPOLoss(FusedLossBase):
    r"""SPO, fused: "Soft Preference Optimization: Aligning Language Models to Expert Distributions"
    (Eqs. 5, 8-15, Alg. 1): a reference-free preference term plus a full-vocabulary KL regularizer on
    online samples.

    ``loss = mean_pairs[(mu / alpha) softplus(alpha (S_l - S_w))] + kl_coef * mean_s K_s`` with
    ``mu = sg(2 sigma(exp(gamma logaddexp(S_w, S_l)) - E_batch[...]))`` (gamma = 0: mu = 1) and
    ``K_s = sum_t KL(pi_theta(.|ctx_t) || pi_ref(.|ctx_t))`` over the online sample's positions.
    ``mode="best_of_n"`` (Eq. 14, call keyword ``best`` [B] int64, checked by the head
    :func:`fastpref.losses.spo_best_of_n`) and ``mode="ranked"`` (Eq. 15, columns in rank order) use the
    grouped layout with ``group_size`` = n. ``rank_decay`` η (ranked only, in (0, 1]) weights the k-th ranked
    term by η^k (App. E.3's decayed weight functions η^k·μ_k; 1 = Eq. 15 as written).

    Call keywords: ``kl_hidden``, ``kl_ref_hidden``, ``kl_targets`` (+ ``kl_seq_ids``/``kl_num_seqs`` when
    packed): the online samples y' ~ pi_theta(.|x') in the same layouts as ``hidden``; a second fused
    pass computes their token KL(pi_theta || pi_ref) with gradient through ``kl_hidden``, ``weight`` and
    ``bias``, with the call's logit map (``temperature``, ``softcap``). The reference head is
    ``ref_weight``/``ref_bias`` (default: the policy head, detached). Without ``kl_hidden`` the loss is
    the preference term only. ``weight_baseline`` (call keyword) overrides the batch estimate E_batch;
    when torch.distributed is initialized and it is not given, E is the mean over the global batch
    (``stats_group``, see :class:`FusedLossBase`; docs/losses.md §5 recommends the global batch).
    """

    reference_mode = "none"
    extra_pass_reads_ref_head = True  # the online samples' kl_ref_hidden
    modes = ("pairs", "best_of_n", "ranked")

    def __init__(self, alpha: float = 0.01, gamma: float = 0.0, kl_coef: float = 0.01, mode: str = "pairs",
                 group_size: Optional[int] = None, rank_decay: float = 1.0, **options) -> None:
        super().__init__(**options)
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        if mode != "pairs" and group_size is None:
            raise ValueError(f"mode={mode!r} needs group_size (n responses per prompt)")
        self.rank_decay = check_positive("rank_decay", rank_decay)
        if self.rank_decay > 1.0 or (mode != "ranked" and self.rank_decay != 1.0):
            raise ValueError(f"rank_decay must be in (0, 1] and is only for mode='ranked' (App. E.3's decayed "
                             f"weights); got rank_decay={rank_decay!r} with mode={mode!r}")
        self.alpha, self.gamma, self.kl_coef, self.mode = alpha, gamma, kl_coef, mode
        self.group_size = None if group_size is None else check_int("group_size", group_size, minimum=2)

    def online_kl(self, batch: SequenceBatch, kl_hidden: Optional[Tensor], kl_ref_hidden: Optional[Tensor],
                  kl_targets: Optional[Tensor], kl_seq_ids: Optional[Tensor],
                  kl_num_seqs: Optional[int]) -> Optional[Tensor]:
        """Per-sample summed token KL(pi_theta || pi_ref) of the online samples, or None without them."""
        given = [x is not None for x in (kl_hidden, kl_ref_hidden, kl_targets)]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("FusedSPOLoss: the online samples need all of kl_hidden, kl_ref_hidden and kl_targets")
        stats = self.extra_logprobs(batch, kl_hidden, kl_targets, seq_ids=kl_seq_ids, num_seqs=kl_num_seqs,
                                    ref_hidden=kl_ref_hidden, kl="forward")
        return stats.kl

    def grouped_logps(self, batch: SequenceBatch, best: Optional[Tensor]) -> Tensor:
        """``[B, n]`` policy log-probs by the mode's layout (pairs: chosen, rejected); ``best`` only for best_of_n."""
        if self.mode != "best_of_n" and best is not None:
            raise ValueError(f"best is for mode='best_of_n'; mode={self.mode!r} takes "
                             + ("pairs (chosen first)" if self.mode == "pairs" else "columns in rank order"))
        if self.mode == "best_of_n" and best is None:
            raise ValueError("mode='best_of_n' needs best: [B] int64 index of the best response in each group")
        if self.mode == "pairs":
            check_pairwise(batch.num_seqs)
            return torch.stack(split_pairs(batch.logps), dim=1)
        return batch.logps.view(check_grouped(batch.num_seqs, self.group_size), self.group_size)

    def compute_loss(self, batch: SequenceBatch, kl_hidden: Optional[Tensor] = None,
                     kl_ref_hidden: Optional[Tensor] = None, kl_targets: Optional[Tensor] = None,
                     kl_seq_ids: Optional[Tensor] = None, kl_num_seqs: Optional[int] = None,
                     best: Optional[Tensor] = None, weight_baseline: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        kl = self.online_kl(batch, kl_hidden, kl_ref_hidden, kl_targets, kl_seq_ids, kl_num_seqs)
        logps = self.grouped_logps(batch, best)
        if weight_baseline is None and is_distributed() and self.stats_group != "local":
            # Eq. 12's E over the global batch (docs/losses.md §5): all-reduce this rank's estimate.
            local = losses.spo_weight_baseline(logps, gamma=self.gamma, ranked=self.mode == "ranked")
            weight_baseline = self.mean_statistic(local, logps.shape[0])
        common = dict(alpha=self.alpha, gamma=self.gamma, kl=kl, kl_coef=self.kl_coef,
                      weight_baseline=weight_baseline)
        if self.mode == "pairs":
            return losses.spo(logps[:, 0], logps[:, 1], **common)
        if self.mode == "ranked":
            return losses.spo_ranked(logps, rank_decay=self.rank_decay, **common)
        return losses.spo_best_of_n(logps, best, **common)
