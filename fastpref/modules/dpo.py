"""DPO and TRL 1.16's DPO loss family, fused (docs/api.md §3, docs/losses.md §6.10): the pairwise layout,
sequence ``i`` (chosen) pairs with sequence ``i + S/2`` (rejected)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .. import losses
from .._checks import check_finite, check_values
from ..losses.dpo_family import SORTING_LOSS_TYPES, LossTypes
from .base import Metrics, SequenceBatch, Tensor, _PairwiseLoss, split_pairs, with_extra_outputs

#: The op's extra outputs that WPO weighting (``use_weighting``) reads.
WPO_OUTPUTS = ("log_sum_sq_probs",)


class FusedDPOLoss(_PairwiseLoss):
    r"""DPO (Rafailov et al. 2023, arXiv:2305.18290) and TRL 1.16's DPO family, fused.

    Default (``loss_type="sigmoid"``): with h = (S_w - R_w) - (S_l - R_l) (summed log-probs, policy S,
    reference R) and label smoothing eps, ``loss = mean[-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)]``
    (:func:`fastpref.losses.dpo`). Our ``label_smoothing`` on ``"sigmoid"`` is this conservative (cDPO) form;
    TRL's and Liger's ``"sigmoid"`` ignore it (use ``"robust"``, ``"exo_pair"``, ``"aot"`` or
    ``"aot_unpaired"``, where TRL uses it). Equal to Liger-Kernel's ``LigerFusedLinearDPOLoss`` at eps = 0.

    TRL ``DPOConfig``'s options, names and defaults (formulas: :func:`fastpref.losses.dpo_family` and
    docs/losses.md §6): ``loss_type`` (a name or a list), ``loss_weights``, ``f_divergence_type``,
    ``f_alpha_divergence_coef``, ``discopop_tau``; ``ld_alpha`` (LD-DPO, :func:`fastpref.losses.ld_logps`,
    applied to the reference when ``ref_hidden`` is given; precomputed ``ref_logps`` must be LD-weighted
    already, as TRL's are); ``use_weighting`` (WPO: per-pair loss times the detached
    ``w_chosen * w_rejected``, read from the op's ``log_sum_sq_probs`` output). Liger-Kernel's:
    ``average_log_prob`` (policy and reference log-probs, given ``ref_logps`` too, divided by n) and
    ``compute_nll_loss`` (adds ``alpha`` * the chosen-token NLL, metric ``nll``); Liger's logit means are
    not computed (the fused op forms no logits). ``smooth_sigmoid=False`` makes ``"sigmoid"`` ignore
    ``label_smoothing`` as TRL's does (the smoothing then only reaches the loss types that use it).

    Needs the reference: ``ref_hidden`` (computed in the same fused pass) or ``ref_logps`` [S].
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: LossTypes = "sigmoid",
                 loss_weights: Optional[Sequence[float]] = None, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05, ld_alpha: Optional[float] = None,
                 use_weighting: bool = False, average_log_prob: bool = False, compute_nll_loss: bool = False,
                 alpha: float = 1.0, smooth_sigmoid: bool = True, **options) -> None:
        if use_weighting:
            options = with_extra_outputs(options, WPO_OUTPUTS)
        super().__init__(**options)
        types, weights = losses.check_dpo_options(
            loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, use_weighting=use_weighting)
        if ld_alpha is not None:
            ld_alpha = check_finite("ld_alpha", ld_alpha)
            if not 0.0 <= ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
            if average_log_prob:
                raise ValueError("ld_alpha and average_log_prob do not combine (LD-DPO weights summed log-probs)")
        self.beta, self.label_smoothing = beta, label_smoothing
        self.loss_type = loss_type if isinstance(loss_type, str) else list(types)
        self.loss_weights = None if loss_weights is None else list(weights)
        self.f_divergence_type, self.f_alpha_divergence_coef = f_divergence_type, f_alpha_divergence_coef
        self.discopop_tau, self.ld_alpha, self.use_weighting = discopop_tau, ld_alpha, bool(use_weighting)
        self.average_log_prob, self.compute_nll_loss = bool(average_log_prob), bool(compute_nll_loss)
        self.alpha = check_finite("alpha", alpha)
        self.smooth_sigmoid = bool(smooth_sigmoid)
        self._types, self._weights = types, weights

    def _is_plain_dpo(self) -> bool:
        """Only ``beta``/``label_smoothing`` set: the original head, bitwise as before the DPO-family options."""
        return (self._types == ("sigmoid",) and self._weights == (1.0,) and self.f_divergence_type == "reverse_kl"
                and self.smooth_sigmoid and self.ld_alpha is None and not self.use_weighting and not self.average_log_prob
                and not self.compute_nll_loss)

    def sequence_batch(self, stats, ref, head, ref_head, *, targets: Tensor, seq_ids: Optional[Tensor]
                       ) -> SequenceBatch:
        """The base batch, plus the layout (valid positions, ``seq_ids``) that LD-DPO and WPO read."""
        batch = super().sequence_batch(stats, ref, head, ref_head, targets=targets, seq_ids=seq_ids)
        if self._is_plain_dpo():
            return batch
        return _LayoutBatch(**vars(batch), valid=targets != self.ignore_index,
                            seq_ids=None if seq_ids is None else seq_ids.long())

    def separable_call(self, loss_specific: dict) -> bool:
        """Pairs are independent unless a loss type sorts the batch (AOT) or WPO reads the op's extra outputs."""
        return not self.use_weighting and not any(t in SORTING_LOSS_TYPES for t in self._types)

    def _sequence_logps(self, batch: "_LayoutBatch") -> Tuple[Tensor, Tensor]:
        """Per-sequence policy and reference log-probs after LD-DPO weighting or length averaging."""
        logps, ref = batch.logps, batch.ref_logps
        if self.ld_alpha is not None:
            stats = batch.stats
            layout = dict(seq_ids=batch.seq_ids, num_seqs=batch.num_seqs)
            logps = losses.ld_logps(stats.token_logps, batch.valid, self.ld_alpha, **layout)
            if stats.ref_token_logps is not None:  # ref_hidden; precomputed ref_logps are taken as LD-weighted
                ref = losses.ld_logps(stats.ref_token_logps.detach(), batch.valid, self.ld_alpha, **layout)
        if self.average_log_prob:
            check_values(batch.lengths > 0, "average_log_prob needs every sequence to have completion tokens")
            logps, ref = logps / batch.lengths, ref / batch.lengths
        return logps, ref

    def _pair_weights(self, batch: "_LayoutBatch") -> Tensor:
        token_lss = getattr(batch.stats, "token_log_sum_sq_probs", None)
        if token_lss is None:
            raise RuntimeError("use_weighting needs fused_logprobs(..., extra_outputs=('log_sum_sq_probs',)), which "
                               "returned no token_log_sum_sq_probs")
        sums = losses.per_sequence_sums(torch.where(batch.valid, token_lss.detach(), 0.0), seq_ids=batch.seq_ids,
                                        num_seqs=batch.num_seqs)
        w = losses.wpo_sequence_weights(batch.logps, sums, batch.lengths)
        chosen, rejected = split_pairs(w)
        return chosen * rejected

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        if self._is_plain_dpo():
            c, r, rc, rr, _, _ = self.pairs(batch)
            return losses.dpo(c, r, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing)
        c0, _, _, _, lc, lr = self.pairs(batch)
        logps, ref = self._sequence_logps(batch)
        (c, r), (rc, rr) = split_pairs(logps), split_pairs(ref)
        nll = losses.chosen_nll(c0, lc) if (self.compute_nll_loss or "sft" in self._types) else None
        loss, metrics = losses.dpo_family(
            c, r, rc, rr, lc, lr, loss_type=self._types, loss_weights=self._weights, beta=self.beta,
            label_smoothing=self.label_smoothing, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.discopop_tau,
            pair_weights=self._pair_weights(batch) if self.use_weighting else None, sft_nll=nll,
            smooth_sigmoid=self.smooth_sigmoid)
        if self.compute_nll_loss:
            loss = loss + self.alpha * nll
            metrics["nll"] = nll.detach()
        return loss, metrics


@dataclass
class _LayoutBatch(SequenceBatch):
    """A :class:`SequenceBatch` that also knows its layout: ``valid`` (targets' shape) and packed ``seq_ids``."""

    valid: Optional[Tensor] = None
    seq_ids: Optional[Tensor] = None
