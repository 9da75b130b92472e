"""Shared pieces of the loss heads: input checks, dtype promotion and the stable primitives.

Every head does its math in float32, or in float64 when any statistic it is given is float64
(docs/losses.md §0 "Precision": margins are differences of O(10^2-10^3) sums, which bf16 destroys).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import check_finite, check_positive, check_values  # noqa: F401  (re-exported for the heads)

Tensor = torch.Tensor
Number = Union[float, int]
Metrics = Dict[str, Tensor]
LossOutput = Tuple[Tensor, Metrics]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def logsigmoid(x: Tensor) -> Tensor:
    """log σ(x) = −softplus(−x), stable for any finite x.

    Uses torch's fused log_sigmoid (min(x, 0) − log1p(e^{−|x|}), gradient σ(−x)) rather than
    ``-F.softplus(-x)``: softplus switches to the identity above its threshold of 20, an absolute
    error of e^{−20} ≈ 2e-9 in value and gradient at margins where the loss is still training.
    """
    return F.logsigmoid(x)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 − e^a) for a < 0, accurate at both ends (Mächler 2012).

    Near 0, 1 − e^a cancels, so use log(−expm1(a)); far from 0, e^a is tiny and log1p(−e^a) is exact.
    """
    near_zero = a > -math.log(2.0)
    # Evaluate each branch only on inputs where it is finite, so autograd sees no inf*0.
    safe_near = torch.where(near_zero, a, torch.full_like(a, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(a, -1.0), a)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any given statistic is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def as_tensor_stat(name: str, value: Union[Tensor, Number], dtype: torch.dtype, device) -> Tensor:
    """A scalar batch statistic (a number or a 0-d / 1-element tensor) as a detached 0-d tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(check_finite(name, value), dtype=dtype, device=device)


def floats(shape: Sequence[Optional[int]], **named: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """Check named statistics and promote them to one compute dtype.

    ``shape`` gives the expected dims; ``None`` entries are free but must agree across all the
    tensors (e.g. ``(None,)`` = equal-length 1-D). ``None`` arguments pass through as ``None``.
    Statistics must be floating tensors (an integer log-prob is almost certainly a caller's bug);
    only token counts, the arguments named ``*lengths``, may also be integer tensors and are
    converted to the compute dtype.
    """
    present = {k: v for k, v in named.items() if v is not None}
    sizes = list(shape)
    for name, t in present.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be a real float tensor, got {t.dtype}")
        if not t.dtype.is_floating_point and not name.endswith("lengths"):
            raise TypeError(f"{name} must be a floating tensor (float32/float64/bf16/fp16), got {t.dtype}")
        if t.dim() != len(sizes):
            raise ValueError(f"{name} must have {len(sizes)} dim(s), got shape {tuple(t.shape)}")
        for d, n in enumerate(t.shape):
            if sizes[d] is None:
                sizes[d] = n
            elif sizes[d] != n:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected size {sizes[d]} at dim {d} "
                    f"(all statistics of one call must match)"
                )
    if any(n == 0 for n in sizes if n is not None):
        raise ValueError(f"empty batch: {', '.join(present)} have a zero-size dimension")
    dtype = compute_dtype(*[t for t in present.values() if t.dtype in _FLOATS])
    return tuple(None if v is None else v.to(dtype) for v in named.values())


def check_lengths(**named: Tensor) -> Tuple[Tensor, ...]:
    """Lengths are constants and must be strictly positive (a zero would silently divide to inf/NaN)."""
    for name, t in named.items():
        check_values(t > 0, f"{name} must be > 0 everywhere (a sequence with no response tokens?)")
    return tuple(t.detach() for t in named.values())


def pair_metrics(chosen_logps: Tensor, rejected_logps: Tensor, chosen_rewards: Optional[Tensor] = None,
                 rejected_rewards: Optional[Tensor] = None) -> Metrics:
    """Detached per-pair metrics shared by the pairwise heads (all tensors of shape [B])."""
    m = {"chosen_logps": chosen_logps.detach(), "rejected_logps": rejected_logps.detach()}
    if chosen_rewards is not None:
        cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
        m.update(chosen_rewards=cr, rejected_rewards=rr, reward_margin=cr - rr, reward_accuracy=(cr > rr).to(cr.dtype))
    return m
