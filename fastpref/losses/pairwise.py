"""Pairwise baselines (docs/losses.md §6): DPO, IPO, SimPO, SLiC-HF, DPOP, ORPO, CPO.

Notation: S = summed policy log-prob (grad), R = summed reference log-prob (const), n = response
length, S̄ = S/n, h = (S_w − R_w) − (S_l − R_l), ls = log σ. ``g`` is ∂ℓ/∂S for one pair; the returned
loss is the mean over the B pairs. All inputs are [B].
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import (
    LossOutput,
    Tensor,
    check_finite,
    check_lengths,
    check_positive,
    floats,
    log1mexp,
    logsigmoid,
    pair_metrics,
)

# Keep ORPO's mean log-prob strictly below 0: log-odds and 1/(1 − e^a) diverge as p → 1.
ORPO_MAX_MEAN_LOGP = -1e-6
# simpo's γ default (absolute, docs/api.md); gamma_beta_ratio may only replace it when γ is left at it.
SIMPO_DEFAULT_GAMMA = 0.5


def dpo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, Eq. 7), with conservative label smoothing ε.

    ℓ = −(1−ε)·ls(βh) − ε·ls(−βh).
    Gradient: g_w = −β[(1−ε)σ(−βh) − εσ(βh)] = −g_l.
    Defaults: β = 0.1 (TRL), ε = 0. Metrics: implicit rewards β(S − R), their margin and accuracy.
    """
    beta = check_positive("beta", beta)
    eps = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    sw, sl, rw, rl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    rw, rl = rw.detach(), rl.detach()
    x = beta * ((sw - rw) - (sl - rl))
    loss = (-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)).mean()
    return loss, pair_metrics(sw, sl, beta * (sw - rw), beta * (sl - rl))


def ipo(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
        chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
        *, tau: float = 0.1, length_normalize: bool = True) -> LossOutput:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm...", empirical IPO).

    ℓ = (h̄ − 1/(2τ))², where h̄ is h built from length-averaged S̄, R̄ (TRL / α-DPO code;
    ``length_normalize=False`` uses the sums, as in the IPO paper).
    Gradient: g_w = 2(h̄ − 1/(2τ))/n_w, g_l = −2(h̄ − 1/(2τ))/n_l (n = 1 without normalization).
    Default: τ = 0.1. Metrics: rewards S̄ − R̄ (S − R without normalization), no β in IPO.
    """
    tau = check_positive("tau", tau)
    if length_normalize and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths are required when length_normalize=True")
    sw, sl, rw, rl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                    ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                    chosen_lengths=chosen_lengths if length_normalize else None,
                                    rejected_lengths=rejected_lengths if length_normalize else None)
    rw, rl = rw.detach(), rl.detach()
    if length_normalize:
        nw, nl = check_lengths(chosen_lengths=nw, rejected_lengths=nl)
        sw_, sl_, rw_, rl_ = sw / nw, sl / nl, rw / nw, rl / nl
    else:
        sw_, sl_, rw_, rl_ = sw, sl, rw, rl
    h = (sw_ - rw_) - (sl_ - rl_)
    loss = ((h - 1.0 / (2.0 * tau)) ** 2).mean()
    return loss, pair_metrics(sw, sl, sw_ - rw_, sl_ - rl_)


def simpo(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
          *, beta: float = 2.0, gamma: float = 0.5, sft_weight: float = 0.0,
          gamma_beta_ratio: Optional[float] = None) -> LossOutput:
    """Simple Preference Optimization (Meng et al. 2024; MC-PO paper Table 5), reference-free.

    u = β(S̄_w − S̄_l) − γ;  ℓ = −ls(u) − λ_sft·S̄_w.
    Gradient: g_w = −βσ(−u)/n_w − λ_sft/n_w, g_l = +βσ(−u)/n_l.
    Defaults: β = 2.0, γ = 0.5 absolute (docs/api.md), λ_sft = 0. Rewards: βS̄.
    SimPOConfig's ``gamma_beta_ratio`` (default 0.25) means γ = ratio·β, which equals γ = 0.5 only at
    β = 2. Pass ``gamma_beta_ratio`` instead of ``gamma`` to set γ = ratio·β (then ``gamma`` must stay at
    its default: giving both is ambiguous and raises ValueError).
    """
    beta = check_positive("beta", beta)
    gamma = check_finite("gamma", gamma)
    if gamma_beta_ratio is not None:
        if gamma != SIMPO_DEFAULT_GAMMA:
            raise ValueError(f"pass gamma or gamma_beta_ratio, not both (got gamma={gamma}, "
                             f"gamma_beta_ratio={gamma_beta_ratio})")
        gamma = check_finite("gamma_beta_ratio", gamma_beta_ratio) * beta
    sft_weight = check_finite("sft_weight", sft_weight)
    sw, sl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    nw, nl = check_lengths(chosen_lengths=nw, rejected_lengths=nl)
    aw, al = sw / nw, sl / nl
    loss = (-logsigmoid(beta * (aw - al) - gamma) - sft_weight * aw).mean()
    return loss, pair_metrics(sw, sl, beta * aw, beta * al)


def slic(chosen_logps: Tensor, rejected_logps: Tensor, *, delta: float = 1.0, reg_weight: float = 0.1,
         sft_logps: Optional[Tensor] = None) -> LossOutput:
    """SLiC-HF calibration loss (Zhao et al. 2023; formula as in the survey slides).

    ℓ = max(0, δ − (S_w − S_l)) − λ·S_ref, with S_ref the log-prob of the SFT target (default y_w).
    Subgradient: g_w = −1[δ > S_w − S_l], g_l = +1[δ > S_w − S_l], g_ref = −λ.
    Defaults: δ = 1, λ = 0.1 (neither is given in the provided material; see docs/losses.md §6).
    Metrics: the calibration "rewards" are the summed log-probs S themselves.
    """
    delta = check_finite("delta", delta)
    reg_weight = check_finite("reg_weight", reg_weight)
    sw, sl, sref = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps, sft_logps=sft_logps)
    if sref is None:
        sref = sw
    loss = (torch.relu(delta - (sw - sl)) - reg_weight * sref).mean()
    return loss, pair_metrics(sw, sl, sw, sl)


def dpop(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
         *, beta: float = 0.3, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive (Smaug; Pal et al. 2024): penalty inside the sigmoid, as in the Smaug paper.

    u = β(h − λ·relu(R_w − S_w));  ℓ = −ls(u).
    Gradient: g_w = −βσ(−u)(1 + λ·1[S_w < R_w]), g_l = +βσ(−u).
    Defaults: β = 0.3, λ = 50 (third-party reimplementations; the survey slides put the penalty outside).
    """
    beta = check_positive("beta", beta)
    lam = check_positive("dpop_lambda", dpop_lambda, allow_zero=True)
    sw, sl, rw, rl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    rw, rl = rw.detach(), rl.detach()
    u = beta * ((sw - rw) - (sl - rl) - lam * torch.relu(rw - sw))
    return -logsigmoid(u).mean(), pair_metrics(sw, sl, beta * (sw - rw), beta * (sl - rl))


def orpo(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
         *, orpo_lambda: float = 0.1) -> LossOutput:
    """Odds-Ratio Preference Optimization (Hong et al. 2024, Eqs. 6-7 as quoted in the survey slides).

    a = min(S̄, −1e-6); lo = a − log(1 − e^a) (log-odds); d = lo_w − lo_l;
    L = NLL − λ·mean(ls(d)), NLL = −Σ S_w / Σ n_w (global token mean over chosen tokens, as in the
    ORPO code and TRL). log(1 − e^a) uses the two-branch log1mexp, accurate as S̄ → 0.
    Gradient: g_w = −λσ(−d)/((1 − e^{a_w}) n_w)/B − 1/Σn_w,  g_l = +λσ(−d)/((1 − e^{a_l}) n_l)/B.
    Default: λ = 0.1. Metrics: ``log_odds_ratio`` d [B], ``nll`` (scalar), rewards λ·S̄ (TRL's convention).
    """
    lam = check_positive("orpo_lambda", orpo_lambda, allow_zero=True)
    sw, sl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    nw, nl = check_lengths(chosen_lengths=nw, rejected_lengths=nl)
    aw = torch.clamp(sw / nw, max=ORPO_MAX_MEAN_LOGP)
    al = torch.clamp(sl / nl, max=ORPO_MAX_MEAN_LOGP)
    d = (aw - log1mexp(aw)) - (al - log1mexp(al))
    nll = -sw.sum() / nw.sum()
    loss = nll - lam * logsigmoid(d).mean()
    metrics = pair_metrics(sw, sl, lam * sw / nw, lam * sl / nl)
    metrics.update(log_odds_ratio=d.detach(), nll=nll.detach())
    return loss, metrics


def cpo(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, *, beta: float = 0.1,
        nll_weight: float = 1.0) -> LossOutput:
    """Contrastive Preference Optimization (Xu et al. 2024): reference-free DPO plus NLL on y_w.

    L = mean(−ls(β(S_w − S_l))) + λ·NLL, NLL = −Σ S_w / Σ n_w (token mean over chosen tokens).
    Gradient: g_l = βσ(−β(S_w − S_l))/B, g_w = −g_l − λ/Σn_w.
    Defaults: β = 0.1, λ = 1 (TRL ``cpo_alpha``). Rewards: βS. Metric ``nll`` (scalar).
    The MC-PO paper's Table 5 "CPO" is a SimPO-style variant (length-normalized, with γ); that one is
    :func:`simpo` with ``sft_weight = λβ``.
    """
    beta = check_positive("beta", beta)
    lam = check_positive("nll_weight", nll_weight, allow_zero=True)
    sw, sl, nw = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                        chosen_lengths=chosen_lengths)
    (nw,) = check_lengths(chosen_lengths=nw)
    nll = -sw.sum() / nw.sum()
    loss = -logsigmoid(beta * (sw - sl)).mean() + lam * nll
    metrics = pair_metrics(sw, sl, beta * sw, beta * sl)
    metrics["nll"] = nll.detach()
    return loss, metrics
