"""SPO: Soft Preference Optimization (SPO paper, Eqs. 5, 10-15 and Alg. 1; docs/losses.md §5).

SPO's preference term uses only summed policy log-probs S (no reference inside the loss); the
reference enters only through the additive token-level KL(π_θ‖π_ref) on online samples (Eq. 13),
which the fused op computes and passes here as ``kl`` [B_on].
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._common import LossOutput, Tensor, check_positive, check_values, floats, pair_metrics

# Below this α the α = 0 form (Eq. 11) replaces (1/α)·LSE. The switch is continuous in the gradient
# but not in the value: (1/α)·LSE_j(α d_j) = log(n)/α + mean_j d_j + O(α), so the loss jumps by
# ≈ μ·log(n)/α (pairs: μ·log 2/α ≈ 6.9e5·μ at α = 1e-6). The paper defines L⁰ this way on purpose
# ("not the pointwise limit", after Eq. 9); only the gradient limit matters.
ALPHA_ZERO = 1e-6


def _suffix_mass(s: Tensor, gamma: float) -> Tensor:
    """[B, n] detached: column k = (Σ_{j≥k} π(y_j))^γ = exp(γ·LSE_{j≥k} S_j) (Eq. 12's inside, per suffix)."""
    s = s.detach()
    flipped = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # LSE over j >= k
    return torch.exp(gamma * flipped)


def spo_weight_baseline(logps: Tensor, *, gamma: float = 0.0, ranked: bool = False) -> Tensor:
    """This batch's Ê of Eq. 12, detached: mean_b exp(γ·LSE_j S_bj) over a [B, n] group of log-probs.

    Pairs: pass ``torch.stack([chosen, rejected], 1)``. Ranked: returns [n−1], one Ê per suffix length.
    All-reduce (mean over ranks) and pass the result as ``weight_baseline`` to use a global Ê.
    """
    (s,) = floats((None, None), logps=logps)
    mass = _suffix_mass(s, check_positive("gamma", gamma, allow_zero=True)).mean(dim=0)
    return mass[: s.shape[1] - 1] if ranked else mass[0]


def _weights(s: Tensor, gamma: float, baseline: Optional[Union[Tensor, float]], terms: int) -> Tensor:
    """μ_k = sg(2σ(mass_k − Ê_k)) for the first ``terms`` suffixes: [B, terms]."""
    mass = _suffix_mass(s, gamma)[:, :terms]
    if baseline is None:
        base = mass.mean(dim=0)
    else:
        base = torch.as_tensor(baseline, dtype=s.dtype, device=s.device).detach()
        if base.numel() not in (1, terms):
            raise ValueError(f"weight_baseline must be a scalar or have {terms} entries, got shape {tuple(base.shape)}")
        base = base.reshape(-1)
    return 2.0 * torch.sigmoid(mass - base)


def _listwise_term(s: Tensor, winner: Tensor, alpha: float) -> Tensor:
    """Per row, −S_win + (1/α)·LSE_j(αS_j) computed as (1/α)·LSE_j(α(S_j − S_win)), no cancellation.

    For α < 1e-6 uses the α = 0 form mean_j(S_j − S_win), whose gradient is the α → 0 limit
    (Eq. 11; for n = 2 it is −½(S_w − S_l)). Its value is the α → 0 limit minus the constant
    log(n)/α, which has no gradient (see ALPHA_ZERO).
    """
    d = s - s.gather(1, winner[:, None])
    if alpha < ALPHA_ZERO:
        return d.mean(dim=1)
    return torch.logsumexp(alpha * d, dim=1) / alpha


def _spo_listwise(s: Tensor, winners: Tensor, terms: int, alpha, gamma, kl, kl_coef, weight_baseline,
                  decay: float = 1.0) -> LossOutput:
    """Σ_{k < terms} η^(k+1)·μ_k·term_k (term_k over columns k.., winner column ``winners[:, k]``) + kl_coef·mean(kl),
    η = ``decay`` (1: the undecayed sum)."""
    alpha = check_positive("alpha", alpha, allow_zero=True)
    gamma = check_positive("gamma", gamma, allow_zero=True)
    kl_coef = check_positive("kl_coef", kl_coef, allow_zero=True)
    (kl,) = floats((None,), kl=kl)
    if kl is not None and kl.dtype == torch.float64:
        s = s.to(torch.float64)
    mu = _weights(s, gamma, weight_baseline, terms)  # [B, terms]
    # App. E.3's decayed weights η^k·μ_k, k = 1..n−1 (here 0-based k, hence k + 1); η = 1 leaves Eq. 15 unchanged
    pref = sum(decay ** (k + 1) * mu[:, k] * _listwise_term(s[:, k:], winners[:, k] - k, alpha) for k in range(terms))
    if kl is None:
        return pref.mean(), {"logps": s.detach(), "weights": mu.detach()}
    kl = kl.to(s.dtype)
    return pref.mean() + kl_coef * kl.mean(), {"logps": s.detach(), "weights": mu.detach(), "kl": kl.detach()}


def spo(chosen_logps: Tensor, rejected_logps: Tensor, *, alpha: float = 0.01, gamma: float = 0.0,
        kl: Optional[Tensor] = None, kl_coef: float = 0.01,
        weight_baseline: Optional[Union[Tensor, float]] = None) -> LossOutput:
    """SPO on preference pairs: weighted preference loss (Eq. 10) plus the global KL regularizer (Eq. 13).

        ℓ_pref = (μ/α)·softplus(α(S_l − S_w))      (α ≥ 1e-6; = −(μ/α)·log[π_w^α / (π_w^α + π_l^α)])
        ℓ_pref = −½·μ·(S_w − S_l)                  (α < 1e-6: the α = 0 form, Eq. 11)
        μ      = sg(2σ((π_w + π_l)^γ − Ê[(π'_w + π'_l)^γ])),  (π_w + π_l)^γ = exp(γ·logaddexp(S_w, S_l))   (Eq. 12)
        L      = mean_pairs ℓ_pref + kl_coef·mean(kl)

    Eq. 12 raises the *sum* of the two sequence probabilities to γ (not each probability). γ = 0 gives
    μ = 1 ("SPO-basic"); γ = 0.01 weighted SPO. Ê is the mean over this batch unless ``weight_baseline``
    (e.g. an all-reduced :func:`spo_weight_baseline`) is given. ``kl`` [B_on]: per-sample summed token
    KL(π_θ‖π_ref) of online samples from π_θ; the paper's Alg. 1 adds it with coefficient 1, but β
    (here ``kl_coef``) is swept in the experiments, so it is exposed (docs/losses.md §5).
    Gradient (ŝ = σ(α(S_l − S_w))): g_w = −μŝ, g_l = +μŝ (α = 0: ∓μ/2); the KL gradient is kl_coef/B_on
    per online sequence.
    The α ≥ 1e-6 value is the paper's Eq. 10, which carries the constant (μ/α)·softplus(0) = μ·log 2/α
    at S_w = S_l (6.9e5·μ at α = 1e-6). The α = 0 form is Eq. 11, defined by the paper as the
    *gradient* limit (SPO §3, App. A: "not the pointwise limit"). So at the α = 1e-6 switch the loss
    value jumps by ≈ mean(μ)·log 2/α while the gradient is continuous; compare loss values only at a
    fixed α. Defaults: α = 0.01, kl_coef = 0.01 (best in the paper's Table 7), γ = 0.
    Metrics: ``chosen_logps``, ``rejected_logps``, ``weights`` μ [B], ``kl`` [B_on] when given, and
    ``reward_margin`` S_w − S_l / ``reward_accuracy`` 1[S_w > S_l] (the model's preference, Eq. 6, has
    the summed log-probs as its rewards; these are also reported as ``chosen_rewards``/``rejected_rewards``).
    """
    sw, sl = floats((None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    s = torch.stack([sw, sl], dim=1)
    winners = torch.zeros(s.shape[0], 1, dtype=torch.int64, device=s.device)  # y_w is column 0
    loss, m = _spo_listwise(s, winners, 1, alpha, gamma, kl, kl_coef, weight_baseline)
    metrics = pair_metrics(sw, sl, sw, sl)  # SPO's preference P(y_w ≻ y_l) = σ(S_w − S_l) (Eq. 6)
    metrics["weights"] = m.pop("weights")[:, 0]
    m.pop("logps")
    return loss, {**metrics, **m}


def spo_best_of_n(logps: Tensor, best: Tensor, *, alpha: float = 0.01, gamma: float = 0.0,
                  kl: Optional[Tensor] = None, kl_coef: float = 0.01,
                  weight_baseline: Optional[Union[Tensor, float]] = None) -> LossOutput:
    """SPO on best-of-n data (Eq. 14): logps [B, n], best [B] int64 index i* of the expert's choice.

        ℓ_pref = μ·[−S_{i*} + (1/α)·LSE_i(αS_i)]   (α < 1e-6: μ·mean_i(S_i − S_{i*}), the gradient limit)
        μ      = sg(2σ((Σ_i π_i)^γ − Ê[(Σ_i π'_i)^γ]))

    μ generalizes Eq. 12 to the n responses (the paper only requires a symmetric positive μ here);
    for n = 2 this equals :func:`spo`. Gradient: g_j = μ(softmax_j(αS) − 1[j = i*]).
    As in :func:`spo`, the α ≥ 1e-6 value (paper Eq. 14) contains μ·log(n)/α at equal log-probs; the α = 0
    form drops it, so the value jumps by ≈ mean(μ)·log(n)/α at the switch, the gradient does not.
    KL term, defaults and ``weight_baseline`` as in :func:`spo`. Metrics: ``logps``, ``weights`` [B], ``kl``.
    """
    (s,) = floats((None, None), logps=logps)
    if s.shape[1] < 2:
        raise ValueError(f"logps must be [B, n] with n >= 2, got shape {tuple(s.shape)}")
    if not isinstance(best, Tensor) or best.dtype != torch.int64 or best.shape != s.shape[:1]:
        raise ValueError(f"best must be an int64 tensor of shape [{s.shape[0]}], got {getattr(best, 'shape', best)}")
    check_values((best >= 0) & (best < s.shape[1]), f"best must hold column indices in 0..{s.shape[1] - 1}")
    winners = best.to(s.device)[:, None]
    loss, m = _spo_listwise(s, winners, 1, alpha, gamma, kl, kl_coef, weight_baseline)
    m["weights"] = m["weights"][:, 0]
    return loss, m


def spo_ranked(logps: Tensor, *, alpha: float = 0.01, gamma: float = 0.0, kl: Optional[Tensor] = None,
               kl_coef: float = 0.01, weight_baseline: Optional[Union[Tensor, float]] = None,
               rank_decay: float = 1.0) -> LossOutput:
    """SPO on ranked data (Eq. 15): logps [B, n] with columns in rank order, best first.

        ℓ_pref = Σ_{k=1}^{n−1} η^k·μ_k·[−S_k + (1/α)·LSE_{j≥k}(αS_j)]   (α < 1e-6: Σ_k η^k·μ_k·mean_{j≥k}(S_j − S_k))
        μ_k    = sg(2σ((Σ_{j≥k} π_j)^γ − Ê[(Σ_{j≥k} π'_j)^γ]))     (Eq. 12 on the suffix set, Ê per k)

    η = ``rank_decay`` in (0, 1]: the decayed weight functions η^k·μ_k of the paper's ranking experiment
    (App. E.3, η ∈ {1, 0.5}); the default 1 is Eq. 15 as written. The reported ``weights`` are μ_k (without η^k).

    A Plackett-Luce-style sum of best-of-(n−k+1) terms; the k = n term is identically 0 and omitted.
    The α ≥ 1e-6 value (paper Eq. 15) contains Σ_k μ_k·log(n−k+1)/α; the α = 0 form drops it (value jump
    at the switch, continuous gradient; see :func:`spo`).
    ``weight_baseline``: a scalar or [n−1] (one Ê per k, see :func:`spo_weight_baseline` with ranked=True).
    KL term and defaults as in :func:`spo`. Metrics: ``logps``, ``weights`` [B, n−1], ``kl``.
    """
    (s,) = floats((None, None), logps=logps)
    if s.shape[1] < 2:
        raise ValueError(f"logps must be [B, n] with n >= 2, got shape {tuple(s.shape)}")
    decay = check_positive("rank_decay", rank_decay)
    if decay > 1.0:
        raise ValueError(f"rank_decay must be in (0, 1] (App. E.3's decay eta), got {rank_decay!r}")
    n = s.shape[1]
    winners = torch.arange(n, device=s.device).expand(s.shape[0], n)
    return _spo_listwise(s, winners, n - 1, alpha, gamma, kl, kl_coef, weight_baseline, decay)
