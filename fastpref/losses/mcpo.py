"""MC-PO / OnMC-PO: preference optimization with MC-kernel hard negatives (MC-PO paper, Eq. 7 and Alg. 1;
docs/losses.md §3-4). Column 0 of every [B, K+1] statistic is the preferred response y₀."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import LossOutput, Tensor, check_positive, check_values, floats


def _check_grouped(logps: Tensor, ref_logps: Tensor):
    s, r = floats((None, None), logps=logps, ref_logps=ref_logps)
    if s.shape[1] < 2:
        raise ValueError(f"logps must be [B, K+1] with K >= 1 candidates, got shape {tuple(s.shape)}")
    return s, r.detach()


SAMPLINGS = ("mc", "max", "min")


def mcpo_sampling_weights(logps: Tensor, ref_logps: Tensor, *, beta: float = 0.01,
                          include_positive: bool = False) -> Tensor:
    """The MC kernel's weights w_i = softmax_i(β(S_i − R_i)) [B, K+1] (detached; the paper's w_i, Sec. 3).

    ``include_positive=False`` (default) renormalizes over the candidates 1..K, column 0 then has weight 0;
    ``include_positive=True`` is Alg. 1's softmax over all K+1 columns."""
    beta = check_positive("beta", beta)
    s, r = _check_grouped(logps, ref_logps)
    scores = beta * (s - r).detach()
    if not include_positive:
        scores = scores.clone()
        scores[:, 0] = float("-inf")
    return torch.softmax(scores, dim=1)


def mcpo_sample_negatives(logps: Tensor, ref_logps: Tensor, *, beta: float = 0.01, num_negatives: int = 1,
                          generator: Optional[torch.Generator] = None, include_positive: bool = False,
                          sampling: str = "mc") -> Tensor:
    """One step of the MC kernel (Alg. 1): draw M negatives per prompt, P(z = i) ∝ exp(β(S_i − R_i)).

    Rewards use the *current* policy (pass no-grad log-probs of all K+1 sequences). Sampling is
    Gumbel-top-M on βr_i (fp32 or fp64): M distinct negatives, drawn without replacement (the paper does
    not say which for M > 1; docs/losses.md §3 recommends distinct). For M = 1 this is exactly Cat(softmax(βr)).
    ``include_positive=False`` (default) samples from the softmax renormalized over candidates 1..K, so
    y₀ is never returned: drawing z = 0 (allowed by Alg. 1, ``include_positive=True``) makes ℓ = log 2
    with zero gradient, a wasted step. ``include_positive=True`` with M > 1: the M distinct draws come
    from all K+1 columns, so y₀ may be one of them (at most once). :func:`mcpo` then applies Eq. 7
    literally, LSE over i = 0..M with y_i the draws: y₀'s term appears twice (as i = 0 and as a
    drawn negative), which is not a wasted step when the other draws are candidates. Returns int64
    [B, M] column indices; ``generator`` seeds the Gumbel noise (seed it per rank).

    Gradient scale of the default (M = 1): with w_0 = softmax(βr)_0 over all K+1 columns, Alg. 1 draws
    y₀ (zero gradient) with probability w_0 and candidate j with probability w_j, while the default draws
    j with probability w_j / (1 − w_0). The expected gradient of each prompt is therefore **1 / (1 − w_0)
    times** Alg. 1's (same direction): e.g. K = 3 and βr = (1, 0, 0, 0) gives w_0 = e / (e + 3) ≈ 0.475
    and a factor (e + 3) / 3 ≈ 1.91; equal rewards give (K + 1) / K (2x for K = 1). It acts like a per-prompt learning
    rate that grows as y₀ dominates the kernel; account for it when comparing with the literal Alg. 1.

    ``sampling``: ``"mc"`` (default, the MC kernel above), ``"max"`` / ``"min"`` (the paper's Fig. 2
    variants: the M candidates of highest / lowest weight w_i, i.e. of highest / lowest βr_i, in that
    order; deterministic, ``generator`` unused; the pool follows ``include_positive``).
    """
    beta = check_positive("beta", beta)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    s, r = _check_grouped(logps, ref_logps)
    first = 0 if include_positive else 1
    pool = s.shape[1] - first
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or not 1 <= num_negatives <= pool:
        raise ValueError(f"num_negatives must be an int in [1, {pool}], got {num_negatives!r}")
    scores = beta * (s[:, first:] - r[:, first:]).detach()
    if sampling != "mc":  # softmax is monotone: the highest / lowest weights are the highest / lowest βr
        return torch.topk(scores, num_negatives, dim=1, largest=sampling == "max").indices + first
    noise_device = scores.device if generator is None else generator.device
    u = torch.rand(scores.shape, generator=generator, dtype=scores.dtype, device=noise_device).to(scores.device)
    # Gumbel(0,1) = −log(−log U); clamp U away from 0 so the noise stays finite.
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
    return torch.topk(scores + gumbel, num_negatives, dim=1).indices + first


def mcpo(logps: Tensor, ref_logps: Tensor, *, beta: float = 0.01, negatives: Tensor) -> LossOutput:
    """MC-PO loss (Eq. 7; the RNCE objective with MC-kernel negatives), r_i = S_i − R_i:

        ℓ = −βr_0 + LSE_{i ∈ (0, z_1, …, z_M)}(βr_i)   (M = 1: ℓ = −ls(β(r_0 − r_z)), DPO on (y₀, y_z))

    The LSE runs over the list (0, z_1, …, z_M), duplicates kept (Eq. 7's sum over i = 0..M).

    logps/ref_logps [B, K+1] (only columns 0 and ``negatives`` need gradient/values that matter);
    negatives [B, M] int64 in 1..K (0 is accepted too: it is Alg. 1's literal draw of y₀, giving
    ℓ = log 2 with zero gradient for M = 1; for M > 1 its term enters the LSE a second time, Eq. 7
    literally). Gradient with p = softmax over {0} ∪ Z of βr:
    g_0 = −β(1 − p_0), g_j = βp_j (j ∈ Z), 0 for unselected candidates.
    The draws' distribution sets the expected gradient's scale: the default ``include_positive=False``
    gives 1 / (1 − w_0) times Alg. 1's for M = 1 (:func:`mcpo_sample_negatives`).
    Default β = 0.01 (paper App. B.2, also inside the kernel). Metrics: ``negatives``, ``chosen_logps``
    [B], ``rejected_logps`` [B, M], implicit rewards β r (``rejected_rewards`` [B, M]),
    ``reward_margin`` = βr_0 − mean_Z βr_z, ``reward_accuracy`` = 1[r_0 > max_Z r_z].
    """
    beta = check_positive("beta", beta)
    s, r = _check_grouped(logps, ref_logps)
    if not isinstance(negatives, Tensor) or negatives.dtype != torch.int64:
        raise TypeError(f"negatives must be an int64 tensor, got {getattr(negatives, 'dtype', type(negatives))}")
    if negatives.dim() != 2 or negatives.shape[0] != s.shape[0] or negatives.shape[1] < 1:
        raise ValueError(f"negatives must have shape [B, M] with B = {s.shape[0]} (the groups of logps) and "
                         f"M >= 1, got shape {tuple(negatives.shape)}")
    k = s.shape[1] - 1
    check_values((negatives >= 0) & (negatives <= k), f"negatives must be column indices in 0..{k} of the groups of "
                 f"{k + 1} (candidates 1..K; 0, the preferred response, is Alg. 1's literal draw)")
    negatives = negatives.to(s.device)
    reward = beta * (s - r)  # [B, K+1]
    chosen = reward[:, 0]
    rejected = reward.gather(1, negatives)  # [B, M]
    loss = (torch.logsumexp(torch.cat([chosen[:, None], rejected], dim=1), dim=1) - chosen).mean()
    rej_logps = s.gather(1, negatives)
    metrics = {"negatives": negatives, "logps": s.detach(), "chosen_logps": s[:, 0].detach(),
               "rejected_logps": rej_logps.detach(), "chosen_rewards": chosen.detach(),
               "rejected_rewards": rejected.detach(),
               "reward_margin": (chosen - rejected.mean(dim=1)).detach(),
               "reward_accuracy": (chosen > rejected.max(dim=1).values).to(s.dtype).detach()}
    return loss, metrics
