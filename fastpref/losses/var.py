"""VAR: Variational Alignment with Re-weighting (VAR paper, Eqs. 9-10 and Alg. 1; docs/losses.md §1)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._common import LossOutput, Tensor, check_lengths, check_positive, check_values, floats

NORMALIZE = ("self", "none")
POLICY_REDUCTIONS = ("sum", "mean")
REF_REDUCTIONS = ("sum", "mean")


def _var_log_weights(rewards: Tensor, ref_logps: Optional[Tensor], beta: float) -> Tensor:
    """lw_i = r_ii/β − logẐ_i, logẐ_i = LSE_j(r_ij/β + Lref_ij) − log B, all in log space."""
    b = rewards.shape[0]
    if rewards.dim() == 2:  # cross pairs: Ẑ(x_i) over the responses y_j of the micro-batch
        return torch.diagonal(rewards) / beta - (torch.logsumexp(rewards / beta + ref_logps, dim=1) - math.log(b))
    # diagonal form: one Ẑ shared by every prompt; ref_logps=None means π_ref(y_j) taken as 1 (log 0)
    ref = torch.zeros_like(rewards) if ref_logps is None else ref_logps
    return rewards / beta - (torch.logsumexp(rewards / beta + ref, dim=0) - math.log(b))


def var(logps: Tensor, rewards: Tensor, *, beta: float, ref_logps: Optional[Tensor] = None,
        normalize: str = "self", lengths: Optional[Tensor] = None, policy_reduction: str = "sum",
        ref_reduction: str = "sum") -> LossOutput:
    """VAR loss: reward-weighted SFT with in-batch partition estimate (paper Eq. 10, Alg. 1).

    logps [B] = log π_θ(y_i|x_i) (grad); rewards [B, B] with rewards[i, j] = r(x_i, y_j) and ref_logps
    [B, B] with ref_logps[i, j] = log π_ref(y_j|x_i) (cross pairs, Eq. 9); or the diagonal form with
    rewards [B] and ref_logps [B] or None.

        logẐ_i = LSE_j(r_ij/β + Lref_ij) − log B      (Eq. 9, Ẑ(x_i) = (1/B) Σ_j e^{r_ij/β} π_ref(y_j|x_i))
        lw_i   = r_ii/β − logẐ_i,  w_i = sg(e^{lw_i})
        L      = −(1/B) Σ_i w_i · logps_i

    The paper writes Eq. 10 as an objective to maximize and Alg. 1 says "gradient descent"; this is the
    minimization of −Σ w log π, so L ≥ 0 when logps ≤ 0 (Thm. 1). Gradient: ∂L/∂logps_i = −w_i/B.

    normalize="self" (default): w̃ = B·softmax(lw), weights sum to B. Same relative weights as the paper,
    only the per-step scale changes, and e^{lw} (≈ e^{10^2} with summed Lref) never overflows. In the
    diagonal form Ẑ is shared, so w̃ = B·softmax(r/β) and π_ref drops out.
    normalize="none": paper-literal w = e^{lw}, computed in log space; ValueError if a weight is not
    finite (overflow). It needs ref_logps: the literal Ẑ depends on π_ref even in the diagonal form.

    β has no default: the paper reports none; pick it so r/β has O(1) spread within a batch.

    ``lengths`` [B]: response token counts n_j (the fused op's ``lengths``), needed by either "mean" option.
    policy_reduction="sum" (default, the paper's log π_θ(y|x)); "mean" uses logps_i/n_i (token mean,
    "SFT-style", docs/losses.md §1 ambiguity 3): L = −(1/B) Σ_i w_i·logps_i/n_i.
    ref_reduction="sum" (default, the paper's Eq. 9); "mean" replaces Lref_ij by Lref_ij/n_j inside Ẑ
    (response y_j's length; diagonal form: R_i/n_i). This is a **deviation from the paper** (docs/losses.md
    §1 ambiguity 2): Eq. 9 drops the proposal density of y_j ~ π_ref(·|x_j), so summed Lref favours
    short responses and makes the weights extremely peaked; the token mean tames them. It changes the
    weights only where π_ref does not cancel: the cross-pair form, and the diagonal form with
    normalize="none" (with "self" the diagonal weights are B·softmax(r/β) either way). Without
    ref_logps it has nothing to act on and is a no-op.
    Metrics: ``logps`` [B] (as given), ``weights`` [B] (detached), ``log_weights`` [B] (lw, before normalization),
    ``weight_entropy`` (entropy of w/Σw, log B when uniform) and ``effective_sample_size`` ((Σw)²/Σw², B when uniform).
    """
    beta = check_positive("beta", beta)
    summed, s, rew, ref = _var_inputs(logps, rewards, ref_logps, lengths, normalize, policy_reduction,
                                      ref_reduction)
    b = s.shape[0]
    lw = _var_log_weights(rew, ref, beta)
    if normalize == "self":
        w = b * torch.softmax(lw, dim=0)
    else:
        w = torch.exp(lw)
        check_values(torch.isfinite(w), "normalize='none': VAR weights exp(r/β − logẐ) are not finite (overflow); "
                     "use normalize='self' or a larger beta")
    w = w.detach()
    loss = -(w * s).mean()
    # how concentrated the weights are: entropy of w / sum(w) (log B when uniform) and Kish's effective sample
    # size (sum w)^2 / sum w^2 (B when uniform, 1 when one response takes all the weight)
    p = torch.softmax(lw.detach(), dim=0)
    entropy = -(p * torch.log_softmax(lw.detach(), dim=0)).sum()
    ess = 1.0 / (p * p).sum()
    return loss, {"logps": summed.detach(), "weights": w, "log_weights": lw.detach(), "weight_entropy": entropy,
                  "effective_sample_size": ess}


def _var_inputs(logps: Tensor, rewards: Tensor, ref_logps: Optional[Tensor], lengths: Optional[Tensor],
                normalize: str, policy_reduction: str, ref_reduction: str,
                ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Checked statistics of :func:`var` in one compute dtype: (summed logps, logps after
    ``policy_reduction``, rewards, ref_logps after ``ref_reduction`` or None); all but logps detached."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if policy_reduction not in POLICY_REDUCTIONS:
        raise ValueError(f"policy_reduction must be one of {POLICY_REDUCTIONS}, got {policy_reduction!r}")
    if ref_reduction not in REF_REDUCTIONS:
        raise ValueError(f"ref_reduction must be one of {REF_REDUCTIONS}, got {ref_reduction!r}")
    needs_lengths = "mean" in (policy_reduction, ref_reduction)
    if needs_lengths and lengths is None:
        raise ValueError(f"lengths is required when policy_reduction={policy_reduction!r}, "
                         f"ref_reduction={ref_reduction!r} (a 'mean' option divides by response lengths)")
    s, n = floats((None,), logps=logps, lengths=lengths if needs_lengths else None)
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    b = s.shape[0]
    if rewards.dim() == 1:
        (rew, ref) = floats((b,), rewards=rewards, ref_logps=ref_logps)
        if normalize == "none" and ref is None:
            raise ValueError("normalize='none' needs ref_logps: the literal Ẑ depends on π_ref")
    elif rewards.dim() == 2:
        if ref_logps is None:
            raise ValueError("ref_logps [B, B] is required with cross-pair rewards [B, B]")
        rew, ref = floats((b, b), rewards=rewards, ref_logps=ref_logps)
    else:
        raise ValueError(f"rewards must be [B] or [B, B] with B = {b}, got shape {tuple(rewards.shape)}")
    dtype = torch.float64 if torch.float64 in (s.dtype, rew.dtype) else torch.float32
    s, rew = s.to(dtype), rew.detach().to(dtype)
    ref = None if ref is None else ref.detach().to(dtype)
    summed = s
    if n is not None:
        (n,) = check_lengths(lengths=n)
        n = n.to(dtype)
    if policy_reduction == "mean":
        s = s / n
    if ref_reduction == "mean" and ref is not None:
        # Lref[i, j] = log π_ref(y_j | x_i) is a sum over y_j's n_j tokens: divide column j (diagonal: entry i).
        ref = ref / n
    return summed, s, rew, ref
