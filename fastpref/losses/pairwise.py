"""Pairwise baselines (docs/losses.md §6): DPO, IPO, SimPO, SLiC-HF, DPOP, ORPO, CPO.

Notation: S = summed policy log-prob (grad), R = summed reference log-prob (const), n = response
length, S̄ = S/n, h = (S_w − R_w) − (S_l − R_l), ls = log σ. ``g`` is ∂ℓ/∂S for one pair; the returned
loss is the mean over the B pairs. All inputs are [B].
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._common import (
    LossOutput,
    Metrics,
    Tensor,
    check_finite,
    check_lengths,
    check_positive,
    check_values,
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
          gamma_beta_ratio: Optional[float] = None, label_smoothing: float = 0.0,
          nll_weight: float = 0.0) -> LossOutput:
    """Simple Preference Optimization (Meng et al. 2024; MC-PO paper Table 5), reference-free.

    u = β(S̄_w − S̄_l) − γ;  ℓ = −(1−ε)·ls(u) − ε·ls(−u) − λ_sft·S̄_w;  L = mean(ℓ) + λ_nll·NLL,
    NLL = −Σ S_w / Σ n_w (token mean over the chosen tokens, Liger-Kernel's ``compute_nll_loss``).
    Gradient (ε = 0, λ_nll = 0): g_w = −βσ(−u)/n_w − λ_sft/n_w, g_l = +βσ(−u)/n_l.
    Defaults: β = 2.0, γ = 0.5 absolute (docs/api.md), λ_sft = 0, ε = 0, λ_nll = 0. Rewards: βS̄.
    SimPOConfig's ``gamma_beta_ratio`` (default 0.25) means γ = ratio·β, which equals γ = 0.5 only at
    β = 2. Pass ``gamma_beta_ratio`` instead of ``gamma`` to set γ = ratio·β (then ``gamma`` must stay at
    its default: giving both is ambiguous and raises ValueError).
    ``label_smoothing`` ε in [0, 0.5) is the conservative (cDPO-style) form, as Liger-Kernel's SimPO.
    ``nll_weight`` λ_nll is Liger's ``alpha`` with ``compute_nll_loss=True``; the ``nll`` metric is
    reported when λ_nll ≠ 0. ``sft_weight`` is a different term: a mean of per-sequence means.
    """
    beta = check_positive("beta", beta)
    gamma = check_finite("gamma", gamma)
    if gamma_beta_ratio is not None:
        if gamma != SIMPO_DEFAULT_GAMMA:
            raise ValueError(f"pass gamma or gamma_beta_ratio, not both (got gamma={gamma}, "
                             f"gamma_beta_ratio={gamma_beta_ratio})")
        gamma = check_finite("gamma_beta_ratio", gamma_beta_ratio) * beta
    sft_weight = check_finite("sft_weight", sft_weight)
    eps = check_label_smoothing(label_smoothing)
    nll_weight = check_finite("nll_weight", nll_weight)
    sw, sl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    nw, nl = check_lengths(chosen_lengths=nw, rejected_lengths=nl)
    aw, al = sw / nw, sl / nl
    loss = (smoothed_logsigmoid_loss(beta * (aw - al) - gamma, eps) - sft_weight * aw).mean()
    metrics = pair_metrics(sw, sl, beta * aw, beta * al)
    if nll_weight != 0.0:
        nll = chosen_nll(sw, nw)
        loss = loss + nll_weight * nll
        metrics["nll"] = nll.detach()
    return loss, metrics


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
         *, orpo_lambda: float = 0.1, nll_weight: float = 1.0, nll_logps: Optional[Tensor] = None,
         nll_lengths: Optional[Tensor] = None) -> LossOutput:
    """Odds-Ratio Preference Optimization (Hong et al. 2024, Eqs. 6-7 as quoted in the survey slides).

    a = min(S̄, −1e-6); lo = a − log(1 − e^a) (log-odds); d = lo_w − lo_l;
    L = λ_nll·NLL − λ·mean(ls(d)), NLL = −Σ S_w / Σ n_w (global token mean over chosen tokens, as in the
    ORPO code and TRL). log(1 − e^a) uses the two-branch log1mexp, accurate as S̄ → 0.
    Gradient (λ_nll = 1): g_w = −λσ(−d)/((1 − e^{a_w}) n_w)/B − 1/Σn_w,  g_l = +λσ(−d)/((1 − e^{a_l}) n_l)/B.
    Defaults: λ = 0.1, λ_nll = 1 (``nll_weight``; 0 is Liger-Kernel's ``compute_nll_loss=False``).
    ``nll_logps``/``nll_lengths`` [B]: the chosen sequences' log-prob sums and token counts over other
    targets (Liger's ``nll_target``); the NLL is then −Σ nll_logps / Σ nll_lengths, the odds ratio is unchanged.
    Metrics: ``log_odds_ratio`` d [B], ``nll`` (scalar), rewards λ·S̄ (TRL's convention).
    """
    lam = check_positive("orpo_lambda", orpo_lambda, allow_zero=True)
    nll_weight = check_finite("nll_weight", nll_weight)
    sw, sl, nw, nl, nll_s, nll_n = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                          chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                                          nll_logps=nll_logps, nll_lengths=nll_lengths)
    nw, nl = check_lengths(chosen_lengths=nw, rejected_lengths=nl)
    aw = torch.clamp(sw / nw, max=ORPO_MAX_MEAN_LOGP)
    al = torch.clamp(sl / nl, max=ORPO_MAX_MEAN_LOGP)
    d = (aw - log1mexp(aw)) - (al - log1mexp(al))
    nll = chosen_nll(sw, nw, nll_s, nll_n)
    loss = nll_weight * nll - lam * logsigmoid(d).mean()
    metrics = pair_metrics(sw, sl, lam * sw / nw, lam * sl / nl)
    metrics.update(log_odds_ratio=d.detach(), nll=nll.detach())
    return loss, metrics


def cpo(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
        rejected_lengths: Optional[Tensor] = None, *, beta: float = 0.1, nll_weight: float = 1.0,
        label_smoothing: float = 0.0, average_log_prob: bool = False) -> LossOutput:
    """Contrastive Preference Optimization (Xu et al. 2024): reference-free DPO plus NLL on y_w.

    L = mean(−(1−ε)·ls(x) − ε·ls(−x)) + λ·NLL with x = β(S_w − S_l), NLL = −Σ S_w / Σ n_w (token mean
    over chosen tokens). ``average_log_prob`` puts the length-averaged S̄ = S/n in x and the rewards
    (``rejected_lengths`` then required), as Liger-Kernel's option; the NLL is unchanged.
    Gradient (ε = 0, sums): g_l = βσ(−β(S_w − S_l))/B, g_w = −g_l − λ/Σn_w.
    Defaults: β = 0.1, λ = 1 (TRL ``cpo_alpha``), ε = 0. Rewards: βS (βS̄ when averaged). Metric ``nll``.
    The MC-PO paper's Table 5 "CPO" is a SimPO-style variant (length-normalized, with γ); that one is
    :func:`simpo` with ``sft_weight = λβ``.
    """
    beta = check_positive("beta", beta)
    lam = check_positive("nll_weight", nll_weight, allow_zero=True)
    eps = check_label_smoothing(label_smoothing)
    if average_log_prob and rejected_lengths is None:
        raise ValueError("rejected_lengths is required when average_log_prob=True")
    sw, sl, nw, nl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                            chosen_lengths=chosen_lengths,
                            rejected_lengths=rejected_lengths if average_log_prob else None)
    (nw,) = check_lengths(chosen_lengths=nw)
    nll = chosen_nll(sw, nw)
    if average_log_prob:
        (nl,) = check_lengths(rejected_lengths=nl)
        sw_, sl_ = sw / nw, sl / nl
    else:
        sw_, sl_ = sw, sl
    loss = smoothed_logsigmoid_loss(beta * (sw_ - sl_), eps).mean() + lam * nll
    metrics = pair_metrics(sw, sl, beta * sw_, beta * sl_)
    metrics["nll"] = nll.detach()
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# helpers of simpo, orpo and cpo


def check_label_smoothing(label_smoothing: float) -> float:
    """The conservative label-smoothing ε of the sigmoid heads, in [0, 0.5)."""
    eps = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return eps


def smoothed_logsigmoid_loss(x: Tensor, eps: float) -> Tensor:
    """−(1−ε)·ls(x) − ε·ls(−x) elementwise; exactly −ls(x) at ε = 0."""
    if eps == 0.0:
        return -logsigmoid(x)
    return -(1.0 - eps) * logsigmoid(x) - eps * logsigmoid(-x)


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor, nll_logps: Optional[Tensor] = None,
               nll_lengths: Optional[Tensor] = None) -> Tensor:
    """Token-mean NLL over the chosen responses: −Σ S_w / Σ n_w, or over other targets when
    ``nll_logps``/``nll_lengths`` (both [B]) are given (ValueError if only one is, or if they count no token)."""
    if (nll_logps is None) != (nll_lengths is None):
        raise ValueError("pass both nll_logps and nll_lengths, or neither")
    if nll_logps is None:
        return -chosen_logps.sum() / chosen_lengths.sum()
    total = nll_lengths.detach().sum()
    check_values(total > 0, "nll_lengths must count at least one token (are all nll targets ignored?)")
    return -nll_logps.sum() / total


# ---------------------------------------------------------------------------------------------------
# Liger-Kernel's option names (FusedSimPOLoss, FusedORPOLoss, FusedCPOLoss; docs/losses.md §6)

#: Liger-Kernel 0.8.5's constructor keywords and defaults of its chunked SimPO, ORPO and CPO losses.
LIGER_DEFAULTS: Dict[str, Dict[str, object]] = {
    "simpo": dict(ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                  compiled=True, gamma=0.5, chunk_size=1),
    "orpo": dict(ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=1),
    "cpo": dict(ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                compiled=True, average_log_prob=False, chunk_size=1),
}
#: Liger's default NLL weight ``alpha``, taken when ``compute_nll_loss=True`` comes without a weight.
LIGER_NLL_ALPHA = 1.0


def liger_options(loss: str, kwargs: Dict[str, object]) -> Dict[str, object]:
    """Our module's constructor keywords for Liger-Kernel's ``kwargs`` of ``loss`` ("simpo", "orpo", "cpo").

    Liger's defaults fill what is not given; ``compiled`` and ``chunk_size`` (its chunking) are dropped;
    ORPO's ``beta`` becomes ``orpo_lambda``; ``alpha``/``compute_nll_loss`` become ``nll_weight``
    (``alpha`` when the NLL is on, else 0; ORPO's NLL weight is 1). Keywords Liger does not have
    (``backend``, ...) pass through; one that collides with a translated keyword raises TypeError.
    """
    liger = dict(LIGER_DEFAULTS[loss])
    ours = {k: v for k, v in kwargs.items() if k not in liger}
    liger.update((k, v) for k, v in kwargs.items() if k in liger)
    alpha = LIGER_NLL_ALPHA if loss == "orpo" else liger["alpha"]
    out: Dict[str, object] = dict(ignore_index=liger["ignore_index"],
                                  nll_weight=alpha if liger["compute_nll_loss"] else 0.0)
    if loss == "orpo":
        out["orpo_lambda"] = liger["beta"]
    else:
        out.update(beta=liger["beta"], label_smoothing=liger["label_smoothing"])
    if loss == "simpo":
        out["gamma"] = liger["gamma"]
    if loss == "cpo":
        out["average_log_prob"] = liger["average_log_prob"]
    clash = sorted(set(out) & set(ours))
    if clash:
        raise TypeError(f"from_liger: {clash[0]!r} is set from Liger-Kernel's keywords; pass Liger's name instead")
    return {**out, **ours}


def liger_alias(owner: str, ours: str, value: object, liger: str, liger_value: object) -> object:
    """The value given under our name or under Liger-Kernel's alias (TypeError if both are given)."""
    if liger_value is None:
        return value
    if value is not None:
        raise TypeError(f"{owner}: pass {ours} or its Liger-Kernel alias {liger}, not both")
    return liger_value


def nll_weight_option(owner: str, nll_weight: Optional[float], alpha: Optional[float],
                      compute_nll_loss: Optional[bool], *, default: float) -> float:
    """The NLL weight of a module from ``nll_weight`` (or Liger's alias ``alpha``) and Liger's switch
    ``compute_nll_loss``: None: the weight given, else ``default``; True: the weight given, else Liger's 1;
    False: 0 (ValueError if a non-zero weight is given with it)."""
    weight = liger_alias(owner, "nll_weight", nll_weight, "alpha", alpha)
    if compute_nll_loss is None:
        return float(default if weight is None else weight)
    if not compute_nll_loss:
        if weight not in (None, 0, 0.0):
            raise ValueError(f"{owner}: compute_nll_loss=False drops the NLL term, but nll_weight/alpha={weight} "
                             "was given")
        return 0.0
    return float(LIGER_NLL_ALPHA if weight is None else weight)


class LigerCompatible:
    """Mixin of the fused SimPO, ORPO and CPO modules: :meth:`from_liger`."""

    _LIGER_NAME = ""  # the key of LIGER_DEFAULTS

    @classmethod
    def from_liger(cls, **kwargs: object) -> object:
        """The module equal to Liger-Kernel 0.8.5's loss built with these constructor keywords, Liger's
        defaults filling the rest (:func:`liger_options`). Liger's module call
        ``(lin_weight, _input, target, bias)`` is ours: ``loss_fn(weight, hidden, targets, bias=...)``."""
        return cls(**liger_options(cls._LIGER_NAME, kwargs))

    def liger_metrics(self, batch: object, out: LossOutput) -> LossOutput:
        """``out`` plus Liger's ``chosen_logits_mean``/``rejected_logits_mean`` when the module computes the
        ``mean_logits`` extra output (``extra_outputs=("mean_logits",)``): see :func:`logits_means`."""
        if "mean_logits" not in getattr(self, "extra_outputs", ()):
            return out
        loss, metrics = out
        metrics.update(logits_means(batch.stats.mean_logits, batch.stats.lengths))
        return loss, metrics


def logits_means(mean_logits: Tensor, lengths: Tensor) -> Metrics:
    """Mean logit of the chosen and of the rejected half of a pairwise batch, over their non-ignored
    positions and the full vocabulary, from per-sequence sums of per-position vocabulary means
    ``mean_logits`` [S] and token counts ``lengths`` [S]. Liger-Kernel divides by B·T·V instead, so it
    also counts padded/ignored positions: the two agree when no position is ignored."""
    half = mean_logits.shape[0] // 2
    sums, counts = mean_logits.detach(), lengths.detach().to(mean_logits.dtype)
    return {"chosen_logits_mean": sums[:half].sum() / counts[:half].sum(),
            "rejected_logits_mean": sums[half:].sum() / counts[half:].sum()}


def chosen_half(hidden: Tensor, targets: Tensor, seq_ids: Optional[Tensor],
                num_seqs: int) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[int]]:
    """The chosen sequences (the first half of a pairwise layout) of padded ``[S, T, ...]`` rows, or of
    packed positions with ``seq_ids`` (selected; their ids 0..S/2-1 stay): (hidden, targets, seq_ids,
    num_seqs) for a fused pass over them alone (``num_seqs`` None when padded)."""
    half = num_seqs // 2
    if seq_ids is None:
        return hidden[:half], targets[:half], None, None
    chosen = seq_ids < half
    return hidden[chosen], targets[chosen], seq_ids[chosen], half
