"""The pairwise fused losses (docs/api.md §3, docs/losses.md §2 and §6): DPO, IPO, SimPO, SLiC, DPOP,
ORPO, CPO and alpha-DPO. Sequence ``i`` (chosen) pairs with sequence ``i + S/2`` (rejected)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import losses
from .._checks import check_finite
from .base import Metrics, SequenceBatch, Tensor, _PairwiseLoss


class FusedDPOLoss(_PairwiseLoss):
    r"""DPO (Rafailov et al. 2023, arXiv:2305.18290), fused.

    With h = (S_w - R_w) - (S_l - R_l) (summed log-probs, policy S, reference R) and label smoothing eps:
    ``loss = mean[-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)]``.

    Needs the reference: ``ref_hidden`` (computed in the same fused pass) or ``ref_logps`` [S].
    Equal to Liger-Kernel's ``LigerFusedLinearDPOLoss`` (default ``loss_type="sigmoid"``, summed
    log-probs) at ``label_smoothing=0``; our ``label_smoothing`` is the cDPO form without Liger's
    ``robust`` 1/(1-2 eps) rescaling.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **options) -> None:
        super().__init__(**options)
        self.beta, self.label_smoothing = beta, label_smoothing

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, _, _ = self.pairs(batch)
        return losses.dpo(c, r, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing)


class FusedIPOLoss(_PairwiseLoss):
    r"""IPO (Azar et al. 2023, arXiv:2310.12036), fused.

    ``loss = mean[(h - 1/(2 tau))^2]`` with h the DPO log-ratio margin; by default (``length_normalize``,
    as TRL and the alpha-DPO code) built from length-averaged log-probs S/n and R/n. Needs the reference.
    """

    def __init__(self, tau: float = 0.1, length_normalize: bool = True, **options) -> None:
        super().__init__(**options)
        self.tau, self.length_normalize = tau, length_normalize

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, lc, lr = self.pairs(batch)
        return losses.ipo(c, r, rc, rr, lc, lr, tau=self.tau, length_normalize=self.length_normalize)


class FusedSimPOLoss(_PairwiseLoss):
    r"""SimPO (Meng et al. 2024, arXiv:2405.14734), fused; reference-free.

    ``u = beta (S_w/n_w - S_l/n_l) - gamma``, ``loss = mean[-log sigma(u)] - sft_weight * mean(S_w/n_w)``.

    ``gamma`` is the absolute margin (default 0.5, docs/api.md §3). SimPOConfig parameterizes it as
    ``gamma_beta_ratio`` (default 0.25) with gamma = ratio * beta, so the two defaults agree only at
    beta = 2; at another beta pass ``gamma_beta_ratio=0.25`` (gamma = 0.25 * beta, as the head
    :func:`fastpref.losses.simpo`; not together with a non-default ``gamma``).

    Difference from Liger-Kernel's ``LigerFusedLinearSimPOLoss``: Liger adds, by default
    (``compute_nll_loss=True``, ``alpha=1``), the chosen responses' token-mean NLL and its default beta
    is 0.1 (ours 2.0, the SimPO config); with ``compute_nll_loss=False`` and the same beta/gamma the two agree.
    """

    reference_mode = "none"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, sft_weight: float = 0.0,
                 gamma_beta_ratio: Optional[float] = None, **options) -> None:
        super().__init__(**options)
        self.beta, self.gamma, self.sft_weight = beta, gamma, sft_weight
        self.gamma_beta_ratio = gamma_beta_ratio

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        return losses.simpo(c, r, lc, lr, beta=self.beta, gamma=self.gamma, sft_weight=self.sft_weight,
                            gamma_beta_ratio=self.gamma_beta_ratio)


class FusedSLiCLoss(_PairwiseLoss):
    r"""SLiC-HF (Zhao et al. 2023, arXiv:2305.10425), fused; reference-free.

    ``loss = mean[max(0, delta - (S_w - S_l)) - reg_weight * S_sft]`` with S_sft the SFT target's log-prob,
    the chosen response unless ``sft_logps`` [S/2] (differentiable) is passed to the call.
    """

    reference_mode = "none"

    def __init__(self, delta: float = 1.0, reg_weight: float = 0.1, **options) -> None:
        super().__init__(**options)
        self.delta, self.reg_weight = delta, reg_weight

    def compute_loss(self, batch: SequenceBatch, sft_logps: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        c, r, _, _, _, _ = self.pairs(batch)
        return losses.slic(c, r, delta=self.delta, reg_weight=self.reg_weight, sft_logps=sft_logps)


class FusedDPOPLoss(_PairwiseLoss):
    r"""DPO-Positive / Smaug (Pal et al. 2024, arXiv:2402.13228), fused.

    ``u = beta (h - lambda * relu(R_w - S_w))``, ``loss = mean[-log sigma(u)]`` (the paper's in-sigmoid
    penalty). Needs the reference.
    """

    def __init__(self, beta: float = 0.3, dpop_lambda: float = 50.0, **options) -> None:
        super().__init__(**options)
        self.beta, self.dpop_lambda = beta, dpop_lambda

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, _, _ = self.pairs(batch)
        return losses.dpop(c, r, rc, rr, beta=self.beta, dpop_lambda=self.dpop_lambda)


class FusedORPOLoss(_PairwiseLoss):
    r"""ORPO (Hong et al. 2024, arXiv:2403.07691), fused; reference-free.

    With a = S/n and log-odds lo = a - log(1 - e^a), d = lo_w - lo_l:
    ``loss = NLL - orpo_lambda * mean[log sigma(d)]``, NLL = -sum(S_w) / sum(n_w) (token mean over chosen).

    Equal to Liger-Kernel's ``LigerFusedLinearORPOLoss`` with its ``beta`` = our ``orpo_lambda``
    (defaults agree at 0.1; Liger also includes the NLL by default). Near p -> 1 we use a stable
    log1mexp with a clamp where Liger uses plain ``log1p(-exp(a))``.
    """

    reference_mode = "none"

    def __init__(self, orpo_lambda: float = 0.1, **options) -> None:
        super().__init__(**options)
        self.orpo_lambda = orpo_lambda

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        return losses.orpo(c, r, lc, lr, orpo_lambda=self.orpo_lambda)


class FusedCPOLoss(_PairwiseLoss):
    r"""CPO (Xu et al. 2024, arXiv:2401.08417), fused; reference-free.

    ``loss = mean[-log sigma(beta (S_w - S_l))] + nll_weight * NLL``, NLL = -sum(S_w) / sum(n_w).

    Equal to Liger-Kernel's ``LigerFusedLinearCPOLoss`` defaults (summed log-probs, beta 0.1,
    ``alpha`` = our ``nll_weight`` = 1, ``label_smoothing=0``).
    """

    reference_mode = "none"

    def __init__(self, beta: float = 0.1, nll_weight: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.beta, self.nll_weight = beta, nll_weight

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, _ = self.pairs(batch)
        return losses.cpo(c, r, lc, beta=self.beta, nll_weight=self.nll_weight)


# ---------------------------------------------------------------------------------------------------
# alpha-DPO


class FusedAlphaDPOLoss(_PairwiseLoss):
    r"""alpha-DPO, fused: Wu et al. 2024, "alpha-DPO: Adaptive Reward Margin is What Direct Preference
    Optimization Needs" (arXiv:2410.10148, Eqs. 9-12; public code junkangwu/alpha-DPO).

    Length-averaged statistics S/n, R/n. The margin signal M = (S̄_w - S̄_l) - (R̄_w - R̄_l) is z-scored with
    running statistics: ``M* = (M - mu) / sigma``, ``m = sg(beta (gamma_beta_ratio + alpha M*))``,
    ``loss = mean[-(1-eps) log sigma(u - m) - eps log sigma(m - u)]`` with u = beta (S̄_w - S̄_l).

    Running statistics (buffers): ``margin_mean`` and ``margin_std`` hold the raw exponential moving
    averages (momentum 0.9, initialized at 0) of the batch mean and unbiased std of M, ``num_updates``
    the number of updates k. In training mode they are updated *before* use from the batch's M,
    gathered over the global batch when torch.distributed is initialized (``stats_group``, see
    :class:`FusedLossBase`: each vocabulary-parallel replica counted once; global batch >= 2 pairs). The
    statistics used are the bias-corrected ``ema / (1 - momentum^k)`` (default) or, with
    ``bias_correction=False``, the raw EMA. In ``eval()`` they are frozen (not updated); before any
    update, eval uses the batch's own statistics.

    Relation to the public code (``junkangwu/alpha-DPO``, ``update_and_sync_ref_mean_std``): with
    ``bias_correction=False`` the *training-mode* update is the same (EMA from 0 with momentum 0.9 of
    the gathered batch's mean and unbiased std, updated before use), but the module is not identical
    to it: (1) the public code also updates the EMA on evaluation batches, the module freezes it in
    ``eval()``; (2) an ``eval()`` call before any training update uses the batch statistics, where
    the public code would update from the zero initialization; (3) the std is floored at 1e-6
    (:func:`fastpref.losses.alpha_dpo`), where the public code divides by the raw EMA (infinite or
    NaN margin at std 0); (4) the buffers are float64 (the public code's are float32).
    Default: docs/api.md §3 (binding) makes bias correction the default; docs/losses.md §2 suggests it
    only as an opt-in. The default follows docs/api.md; pass ``bias_correction=False`` for the public
    code's scale (whose first step z-scores with 0.1·std, inflating M* tenfold). Needs the reference.
    """

    def __init__(self, beta: float = 10.0, gamma_beta_ratio: float = 0.4, alpha: float = 0.05,
                 label_smoothing: float = 0.0, momentum: float = 0.9, bias_correction: bool = True,
                 **options) -> None:
        super().__init__(**options)
        momentum = check_finite("momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.beta, self.gamma_beta_ratio, self.alpha = beta, gamma_beta_ratio, alpha
        self.label_smoothing, self.momentum, self.bias_correction = label_smoothing, momentum, bias_correction
        # float64 buffers: the statistics are a handful of scalars; keep them exact.
        self.register_buffer("margin_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("margin_std", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _batch_statistics(self, margin: Tensor) -> Tuple[Tensor, Tensor]:
        # over the ranks stats_group selects, each distinct batch once (see FusedLossBase)
        gathered = self.gather_statistic(margin).double()
        if gathered.numel() < 2:
            raise ValueError("FusedAlphaDPOLoss needs a global batch of at least 2 pairs to estimate the margin "
                             f"std, got {gathered.numel()} (stats_group={self.stats_group!r})")
        return gathered.mean(), gathered.std(unbiased=True)

    @torch.no_grad()
    def update_statistics(self, margin: Tensor) -> None:
        """One EMA step from the batch margins M (gathered over ranks)."""
        mean, std = self._batch_statistics(margin)
        m = self.momentum
        self.margin_mean.mul_(m).add_((1 - m) * mean.to(self.margin_mean))
        self.margin_std.mul_(m).add_((1 - m) * std.to(self.margin_std))
        self.num_updates += 1

    def margin_statistics(self) -> Tuple[Tensor, Tensor]:
        """The (mean, std) used for z-scoring now: bias-corrected EMA unless ``bias_correction=False``."""
        if not self.bias_correction:
            return self.margin_mean, self.margin_std
        # On device (no host sync per step): 1 - momentum^k.
        correction = 1.0 - self.momentum ** self.num_updates.to(self.margin_mean.dtype)
        return self.margin_mean / correction, self.margin_std / correction

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, lc, lr = self.pairs(batch)
        margin = losses.alpha_dpo_margin(c, r, rc, rr, lc, lr)
        if self.training:
            self.update_statistics(margin)
            mean, std = self.margin_statistics()
        elif int(self.num_updates.item()) == 0:
            mean, std = self._batch_statistics(margin)
        else:
            mean, std = self.margin_statistics()
        like = batch.logps
        mean, std = mean.to(like.dtype), std.to(like.dtype)
        loss, metrics = losses.alpha_dpo(c, r, rc, rr, lc, lr, beta=self.beta,
                                         gamma_beta_ratio=self.gamma_beta_ratio, alpha=self.alpha,
                                         margin_mean=mean, margin_std=std, label_smoothing=self.label_smoothing)
        metrics.setdefault("margin", margin.detach())
        metrics["margin_mean"], metrics["margin_std"] = mean.detach().clone(), std.detach().clone()
        return loss, metrics
