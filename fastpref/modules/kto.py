"""KTO, fused (docs/api.md §3, docs/losses.md §6): unpaired sequences with desirable/undesirable labels."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import losses
from .base import FusedLossBase, Metrics, SequenceBatch, Tensor, as_stat


class FusedKTOLoss(FusedLossBase):
    r"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306), fused; unpaired.

    With rho = S - R and the reference point z0 = max(0, mean(S' - R')) over mismatched pairs (detached):
    desirable ``lambda_D * sigma(-beta (rho - z0))``, undesirable ``lambda_U * sigma(-beta (z0 - rho))``,
    averaged over all S sequences.

    Call keywords: ``labels`` [S] bool (True = desirable), required; and either ``z0`` (a float or a
    scalar tensor) or the mismatched pairs ``kl_hidden``, ``kl_targets`` (+ ``kl_seq_ids``/``kl_num_seqs``
    when packed) with ``kl_ref_hidden`` or precomputed ``kl_ref_logps``: a no-grad fused pass (through
    the call's heads) gives S', R', and z0 is their mean over the global batch when torch.distributed is
    initialized (``stats_group``, see :class:`FusedLossBase`). A ``z0`` passed directly is used as given:
    it must be finite (the head :func:`fastpref.losses.kto` checks it, and the labels), but it is not
    clamped at 0 (a negative value is accepted), like Liger's ``kl`` input; only the mismatched-pair
    estimate is clamped.

    Equal to Liger-Kernel's ``LigerFusedLinearKTOLoss`` (``use_ref_model=True``, summed log-probs) when
    its ``kl`` argument is our z0; Liger takes the KL reference point as an input and does not clamp it
    at 0, and takes ``(_input, lin_weight)`` in that order. ``average_log_prob`` (Liger's option, default
    False) uses length-averaged log-ratios S/n - R/n, for the mismatched pairs' z0 as well.
    """

    extra_pass_reads_ref_head = True  # the mismatched pairs' kl_ref_hidden

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 average_log_prob: bool = False, **options) -> None:
        super().__init__(**options)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.average_log_prob = average_log_prob  # Liger-Kernel's option: rho = S/n - R/n (mismatched pairs too)

    def reference_point(self, batch: SequenceBatch, *, z0: Optional[Union[Tensor, float]] = None,
                        kl_hidden: Optional[Tensor] = None, kl_targets: Optional[Tensor] = None,
                        kl_ref_hidden: Optional[Tensor] = None, kl_ref_logps: Optional[Tensor] = None,
                        kl_seq_ids: Optional[Tensor] = None, kl_num_seqs: Optional[int] = None,
                        ) -> Union[Tensor, float]:
        """z0 as given, or estimated from the mismatched pairs (a detached scalar; see the class docstring)."""
        if z0 is not None:
            if kl_hidden is not None:
                raise ValueError("FusedKTOLoss: pass either z0 or the mismatched pairs (kl_hidden, ...), not both")
            return z0
        if kl_hidden is None or kl_targets is None:
            raise ValueError("FusedKTOLoss needs the reference point: pass z0, or kl_hidden and kl_targets of "
                             "mismatched pairs with kl_ref_hidden or kl_ref_logps")
        if (kl_ref_hidden is None) == (kl_ref_logps is None):
            raise ValueError("FusedKTOLoss: the mismatched pairs need exactly one of kl_ref_hidden or kl_ref_logps")
        with torch.no_grad():
            stats = self.extra_logprobs(batch, kl_hidden.detach(), kl_targets, seq_ids=kl_seq_ids,
                                        num_seqs=kl_num_seqs, ref_hidden=kl_ref_hidden)
        ref = stats.ref_logps if kl_ref_hidden is not None else as_stat(
            "kl_ref_logps", kl_ref_logps, stats.logps, [stats.logps.shape])
        # Mean over the global batch: gather S' - R' (the head takes the pair as two vectors).
        diffs = self.gather_statistic((stats.logps - ref) / stats.lengths if self.average_log_prob
                                      else stats.logps - ref)
        return losses.kto_z0(diffs, torch.zeros_like(diffs))

    def compute_loss(self, batch: SequenceBatch, labels: Optional[Tensor] = None,
                     **reference_point) -> Tuple[Tensor, Metrics]:
        if labels is None:
            raise ValueError("FusedKTOLoss needs labels: a [S] bool tensor, True = desirable")
        z0 = self.reference_point(batch, **reference_point)
        return losses.kto(batch.logps, batch.ref_logps, labels, z0=z0, beta=self.beta,
                          desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                          average_log_prob=self.average_log_prob, lengths=batch.lengths)
