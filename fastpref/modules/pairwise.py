"""The pairwise fused losses (docs/api.md §3, docs/losses.md §2 and §6): DPO, IPO, SimPO, SLiC, DPOP,
ORPO, CPO and alpha-DPO. Sequence ``i`` (chosen) pairs with sequence ``i + S/2`` (rejected)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import losses
from .._checks import check_finite
from ..losses.pairwise import LigerCompatible, chosen_half, liger_alias, nll_weight_option
from .base import Metrics, SequenceBatch, Tensor, _PairwiseLoss
from .dpo import FusedDPOLoss  # noqa: F401  (re-exported: the pairwise family)


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


class FusedSimPOLoss(LigerCompatible, _PairwiseLoss):
    r"""SimPO (Meng et al. 2024, arXiv:2405.14734), fused; reference-free.

    ``u = beta (S_w/n_w - S_l/n_l) - gamma``,
    ``loss = mean[-(1-eps) log sigma(u) - eps log sigma(-u) - sft_weight * S_w/n_w] + nll_weight * NLL``
    with eps = ``label_smoothing`` and NLL = -sum(S_w) / sum(n_w), the chosen tokens' mean NLL.

    ``gamma`` is the absolute margin (default 0.5, docs/api.md §3). SimPOConfig parameterizes it as
    ``gamma_beta_ratio`` (default 0.25) with gamma = ratio * beta, so the two defaults agree only at
    beta = 2; at another beta pass ``gamma_beta_ratio=0.25`` (gamma = 0.25 * beta, as the head
    :func:`fastpref.losses.simpo`; not together with a non-default ``gamma``).

    Liger-Kernel's ``LigerFusedLinearSimPOLoss`` names are accepted (docs/losses.md §6.3): ``alpha`` is
    ``nll_weight``, ``compute_nll_loss`` switches the NLL (on: weight 1 unless given); its defaults differ
    (beta 0.1, NLL on): :meth:`from_liger` applies them. ``sft_weight`` is a mean of per-sequence means.
    """

    reference_mode = "none"
    _LIGER_NAME = "simpo"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, sft_weight: float = 0.0,
                 gamma_beta_ratio: Optional[float] = None, label_smoothing: float = 0.0,
                 nll_weight: Optional[float] = None, compute_nll_loss: Optional[bool] = None,
                 alpha: Optional[float] = None, **options) -> None:
        super().__init__(**options)
        self.beta, self.gamma, self.sft_weight = beta, gamma, sft_weight
        self.gamma_beta_ratio, self.label_smoothing = gamma_beta_ratio, label_smoothing
        self.nll_weight = nll_weight_option(type(self).__name__, nll_weight, alpha, compute_nll_loss, default=0.0)

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        return self.liger_metrics(batch, losses.simpo(
            c, r, lc, lr, beta=self.beta, gamma=self.gamma, sft_weight=self.sft_weight,
            gamma_beta_ratio=self.gamma_beta_ratio, label_smoothing=self.label_smoothing, nll_weight=self.nll_weight))


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


class FusedORPOLoss(LigerCompatible, _PairwiseLoss):
    r"""ORPO (Hong et al. 2024, arXiv:2403.07691), fused; reference-free.

    With a = S/n and log-odds lo = a - log(1 - e^a), d = lo_w - lo_l:
    ``loss = nll_weight * NLL - orpo_lambda * mean[log sigma(d)]``, NLL = -sum(S_w) / sum(n_w) (token mean
    over chosen; ``nll_weight`` default 1, 0 drops it).

    Call keyword ``nll_targets`` (alias ``nll_target``, Liger's), shaped as ``targets``: the NLL is taken
    over their chosen half instead, by a second fused pass over the chosen hidden states (no logits).

    Liger-Kernel's ``LigerFusedLinearORPOLoss``: its ``beta`` is our ``orpo_lambda`` and is refused here
    (use :meth:`from_liger`); ``compute_nll_loss=False`` is ``nll_weight=0``. Near p -> 1 we clamp and use
    a stable log1mexp where Liger uses plain ``log1p(-exp(a))``.
    """

    reference_mode = "none"
    _LIGER_NAME = "orpo"

    def __init__(self, orpo_lambda: float = 0.1, nll_weight: Optional[float] = None,
                 compute_nll_loss: Optional[bool] = None, **options) -> None:
        if "beta" in options:  # Liger's and TRL's ORPO beta; ours means a sigmoid temperature elsewhere
            raise TypeError("FusedORPOLoss has no beta: Liger-Kernel's ORPO beta is our orpo_lambda; pass "
                            "orpo_lambda=... or use FusedORPOLoss.from_liger(beta=...)")
        super().__init__(**options)
        self.orpo_lambda = orpo_lambda
        self.nll_weight = nll_weight_option(type(self).__name__, nll_weight, None, compute_nll_loss, default=1.0)

    def run_logprobs(self, head: object, hidden: Tensor, targets: Tensor, **options) -> SequenceBatch:
        batch = super().run_logprobs(head, hidden, targets, **options)
        batch.nll_inputs = (hidden, targets.shape, options["seq_ids"])  # what an nll_targets pass reads
        return batch

    def separable_call(self, loss_specific: dict) -> bool:
        """An ``nll_targets`` pass is a second fused op inside the loss: only the plain call is separable here."""
        return loss_specific.get("nll_targets") is None and loss_specific.get("nll_target") is None

    def compute_loss(self, batch: SequenceBatch, nll_targets: Optional[Tensor] = None,
                     nll_target: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        nll_targets = liger_alias("FusedORPOLoss", "nll_targets", nll_targets, "nll_target", nll_target)
        nll_logps = nll_lengths = None
        if nll_targets is not None:
            hidden, shape, seq_ids = batch.nll_inputs
            if tuple(getattr(nll_targets, "shape", ())) != tuple(shape):
                raise ValueError(f"nll_targets must have the shape of targets {tuple(shape)}")
            hidden, nll_targets, seq_ids, num_seqs = chosen_half(hidden, nll_targets, seq_ids, batch.num_seqs)
            stats = self.extra_logprobs(batch, hidden, nll_targets, seq_ids=seq_ids, num_seqs=num_seqs)
            nll_logps, nll_lengths = stats.logps, stats.lengths
        return self.liger_metrics(batch, losses.orpo(c, r, lc, lr, orpo_lambda=self.orpo_lambda, nll_weight=self.nll_weight,
                                                     nll_logps=nll_logps, nll_lengths=nll_lengths))


class FusedCPOLoss(LigerCompatible, _PairwiseLoss):
    r"""CPO (Xu et al. 2024, arXiv:2401.08417), fused; reference-free.

    ``loss = mean[-(1-eps) log sigma(x) - eps log sigma(-x)] + nll_weight * NLL``, x = beta (S_w - S_l),
    NLL = -sum(S_w) / sum(n_w); eps = ``label_smoothing``. ``average_log_prob=True`` uses S/n in x (and
    in the rewards); the NLL is unchanged.

    Equal to Liger-Kernel's ``LigerFusedLinearCPOLoss`` at the same defaults; its names are accepted
    (``alpha`` is ``nll_weight``; ``compute_nll_loss`` as in :class:`FusedSimPOLoss`), and :meth:`from_liger`.
    """

    reference_mode = "none"
    _LIGER_NAME = "cpo"

    def __init__(self, beta: float = 0.1, nll_weight: Optional[float] = None, label_smoothing: float = 0.0,
                 average_log_prob: bool = False, compute_nll_loss: Optional[bool] = None,
                 alpha: Optional[float] = None, **options) -> None:
        super().__init__(**options)
        self.beta, self.label_smoothing, self.average_log_prob = beta, label_smoothing, average_log_prob
        self.nll_weight = nll_weight_option(type(self).__name__, nll_weight, alpha, compute_nll_loss, default=1.0)

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        return self.liger_metrics(batch, losses.cpo(c, r, lc, lr, beta=self.beta, nll_weight=self.nll_weight,
                                                    label_smoothing=self.label_smoothing,
                                                    average_log_prob=self.average_log_prob))


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
    ``bias_correction=False``, the raw EMA. A caller that makes the one update per optimizer step itself
    (:meth:`update_statistics` on the margins of every accumulation micro-batch, as FastPrefDPOTrainer does)
    sets ``update_in_forward = False``; the training-mode calls then use the statistics without updating.
    In ``eval()`` they are frozen (not updated); before any
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

    Metrics as the paper reports them (Sec. 5.3, Fig. 3-4): rewards beta·S̄ and their margin, and, when the
    reference is computed in the same pass (``ref_hidden``), ``chosen_kl`` / ``rejected_kl``: the sequential KL
    D_SeqKL[x, y; pi_ref || pi_theta] (TDPO's, the paper's Eq. 18), summed over the response's positions from the
    full-vocabulary token KL of the fused pass (no gradient). Precomputed ``ref_logps`` give no KL.
    """

    sequence_kl = "reverse"  # KL(pi_ref || pi_theta) per position, the paper's sequential KL
    separable = False  # the margin statistics and their EMA couple the batch

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
        # False while a caller has made the step's one update itself (the trainer's effective-batch pass)
        self.update_in_forward = True

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
            if self.update_in_forward:
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
        if batch.stats.kl is not None:
            metrics["chosen_kl"], metrics["rejected_kl"] = (k.detach() for k in batch.stats.kl.chunk(2))
        return loss, metrics
