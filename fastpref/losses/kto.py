"""KTO: Kahneman-Tversky Optimization on unpaired examples (Ethayarajh et al. 2024, Eq. 8; docs/losses.md §6)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._common import (
    LossOutput,
    Tensor,
    as_tensor_stat,
    check_lengths,
    check_positive,
    check_values,
    floats,
    logsigmoid,
)


def kto_z0(mismatched_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's reference point z₀ = sg(max(0, mean(S′ − R′))) over mismatched pairs (x_j, y_{j+1}).

    A sampled, sequence-level estimate of KL(π_θ‖π_ref). Returns a detached 0-d tensor in the compute
    dtype. Under data parallelism, all-gather the inputs (or all-reduce the mean) before calling.
    """
    s, r = floats((None,), mismatched_logps=mismatched_logps, mismatched_ref_logps=mismatched_ref_logps)
    return torch.clamp((s - r).detach().mean(), min=0.0)


def kto(logps: Tensor, ref_logps: Tensor, labels: Tensor, *, z0: Union[Tensor, float], beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0, average_log_prob: bool = False,
        lengths: Optional[Tensor] = None) -> LossOutput:
    """KTO loss over S unpaired sequences (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", arXiv:2402.01306, Eq. 8); ``labels`` [S] bool, True = desirable.

    ρ = S − R, x = β(ρ − z₀):
      desirable:   ℓ = λ_D·σ(−x),  g = −λ_D·β·σ(x)σ(−x)
      undesirable: ℓ = λ_U·σ(x),   g = +λ_U·β·σ(x)σ(−x)
    L = mean over all S examples: exactly the paper's λ_y − v(x, y) (λ_D − λ_D·σ(x) = λ_D·σ(−x)).
    z₀ is the reference point, treated as a constant (detached). The paper's z₀ is the clamped
    estimate max(0, mean(S′ − R′)) that :func:`kto_z0` computes; ``z0`` given here is **used as
    given, not clamped**: it must be a finite scalar (ValueError otherwise), but a negative value is
    accepted, for parity with Liger-Kernel's KTO, which takes the reference point as an input and does
    not clamp it. To get the paper's behaviour pass ``z0=kto_z0(S′, R′)``. The α-DPO repo's paired,
    undetached z₀ is not reproduced (docs/losses.md §6). Defaults: β = 0.1, λ_D = λ_U = 1.
    Metrics: ``rewards`` βρ [S], ``chosen_rewards`` / ``rejected_rewards`` (desirable / undesirable
    subsets), ``logps``, ``z0``.
    ``average_log_prob`` (Liger-Kernel's option; needs ``lengths`` [S]): ρ = S/n − R/n, the
    length-averaged log-ratio (z₀ is then compared with it as given); the ``logps`` metric stays S.
    """
    beta = check_positive("beta", beta)
    wd = check_positive("desirable_weight", desirable_weight, allow_zero=True)
    wu = check_positive("undesirable_weight", undesirable_weight, allow_zero=True)
    if average_log_prob and lengths is None:
        raise ValueError("lengths is required when average_log_prob=True")
    s, r, n = floats((None,), logps=logps, ref_logps=ref_logps, lengths=lengths if average_log_prob else None)
    if not isinstance(labels, Tensor) or labels.dtype != torch.bool:
        raise TypeError(f"labels must be a bool tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != s.shape:
        raise ValueError(f"labels must have the shape of logps {tuple(s.shape)}, got {tuple(labels.shape)}")
    labels = labels.to(s.device)
    z = as_tensor_stat("z0", z0, s.dtype, s.device)
    check_values(torch.isfinite(z), "z0 must be finite", lambda: f", got {float(z)}")
    rho = s - r.detach()
    if average_log_prob:
        (n,) = check_lengths(lengths=n)
        rho = rho / n
    x = beta * (rho - z)
    # σ(−x) for desirable, σ(x) for undesirable: sign flip keeps one call. exp(log σ(u)) rather than σ(u): its
    # backward σ(u)σ(−u) keeps the saturated tail's gradient, which sigmoid's y(1 − y) rounds to 0 once σ(u) = 1.
    sign = torch.where(labels, -torch.ones_like(x), torch.ones_like(x))
    weight = torch.where(labels, torch.full_like(x, wd), torch.full_like(x, wu))
    loss = (weight * torch.exp(logsigmoid(sign * x))).mean()
    rewards = (beta * rho).detach()
    metrics = {"logps": s.detach(), "rewards": rewards, "chosen_rewards": rewards[labels],
               "rejected_rewards": rewards[~labels], "z0": z}
    return loss, metrics
