"""α-DPO: adaptive reward margin (α-DPO paper, Eqs. 9-12; public code loss_type ``alpha-dpo``; docs/losses.md §2)."""
from __future__ import annotations

from typing import Union

import torch

from ._common import (
    LossOutput,
    Tensor,
    as_tensor_stat,
    check_finite,
    check_lengths,
    check_positive,
    check_values,
    floats,
    logsigmoid,
    pair_metrics,
)

# σ_M = 0 (identical margins) or one gathered element would give an infinite / NaN margin.
MIN_MARGIN_STD = 1e-6


def alpha_dpo_margin(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                     ref_rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """Detached M [B] = (S̄_w − S̄_l) − (R̄_w − R̄_l): the statistic whose running mean/std z-score M.

    Paper Eq. 10 multiplies by β; the code does not. The factor cancels after z-scoring, so this
    follows the code. The module feeds mean/std of M (EMA over all-gathered batches) to :func:`alpha_dpo`.
    """
    sw, sl, rw, rl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                    ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return _margin(sw, sl, rw, rl, *check_lengths(chosen_lengths=nw, rejected_lengths=nl))


def _margin(sw: Tensor, sl: Tensor, rw: Tensor, rl: Tensor, nw: Tensor, nl: Tensor) -> Tensor:
    return ((sw / nw - sl / nl) - (rw / nw - rl / nl)).detach()


def alpha_dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float = 10.0,
              gamma_beta_ratio: float = 0.4, alpha: float = 0.05, margin_mean: Union[Tensor, float],
              margin_std: Union[Tensor, float], label_smoothing: float = 0.0) -> LossOutput:
    """α-DPO loss with the stop-gradient, z-scored adaptive margin.

        u  = β(S̄_w − S̄_l)
        M  = (S̄_w − S̄_l) − (R̄_w − R̄_l)                     (:func:`alpha_dpo_margin`)
        M* = (M − margin_mean) / max(margin_std, 1e-6)
        m  = sg[β(γ_r + α·M*)]
        ℓ  = −(1−ε)·ls(u − m) − ε·ls(m − u)

    This is paper Eq. 12, −ls(u − sg[γ + αM*]), in the code's parameterization: the paper's (γ, α) are
    (β·γ_r, β·α) here, and the paper's β inside M cancels in the z-score. The paper z-scores over the
    training set; the code uses an EMA of all-gathered batch statistics (owned by the module, passed in
    as ``margin_mean`` / ``margin_std``, both treated as constants). ``margin_std`` must be finite and
    >= 0 (a negative std is a caller's bug: ValueError); σ = 0 (identical margins) is floored at 1e-6,
    i.e. M* = (M − μ)/1e-6 there, not an infinite or NaN margin.
    α = 0 gives SimPO with γ = β·γ_r.
    Gradient (x = u − m, k = (1−ε)σ(−x) − εσ(x)): g_w = −βk/n_w, g_l = +βk/n_l; nothing flows through m.
    Defaults: β = 10, γ_r = 0.4, α = 0.05 (paper App. B.1; Gemma2 config). Metrics: ``margin`` M [B],
    rewards βS̄ (as SimPO).
    """
    beta = check_positive("beta", beta)
    gamma_r = check_finite("gamma_beta_ratio", gamma_beta_ratio)
    alpha = check_finite("alpha", alpha)
    eps = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    sw, sl, rw, rl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                    ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    nw, nl = check_lengths(chosen_lengths=nw, rejected_lengths=nl)
    mean = as_tensor_stat("margin_mean", margin_mean, sw.dtype, sw.device)
    std = as_tensor_stat("margin_std", margin_std, sw.dtype, sw.device)
    check_values(torch.isfinite(mean), "margin_mean must be finite", lambda: f", got {float(mean)}")
    check_values(torch.isfinite(std) & (std >= 0), "margin_std must be finite and >= 0", lambda: f", got {float(std)}")
    margin = _margin(sw, sl, rw, rl, nw, nl)
    m = beta * (gamma_r + alpha * (margin - mean) / torch.clamp(std, min=MIN_MARGIN_STD))
    x = beta * (sw / nw - sl / nl) - m
    loss = (-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)).mean()
    metrics = pair_metrics(sw, sl, beta * sw / nw, beta * sl / nl)
    metrics["margin"] = margin
    return loss, metrics
