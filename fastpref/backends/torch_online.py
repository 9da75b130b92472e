"""Online softmax statistics of the torch backend, tile by tile: the running log-sum-exp
(:class:`OnlineLSE`) and the partial sums of the optional per-position outputs (``extra_outputs``).

Per position, next to the online log-sum-exp's running max ``m`` and sum-exp ``s = sum_v exp(z_v - m)``,
three partial sums over the vocabulary are kept:

- ``pz = sum_v exp(z_v - m) z_v`` (rescaled with ``m`` like ``s``): the entropy is
  ``H = lse - sum_v p_v z_v = lse - pz / s``;
- ``s2 = sum_v exp(2 (z_v - m))`` (rescaled with the square of ``s``'s factor): the log-sum-exp of ``2 z``
  is ``2 m + log s2``, so ``log sum_v p_v^2 = log s2 - 2 log s``;
- ``sz = sum_v z_v``: the mean logit is ``sz / V`` (V the whole vocabulary's size).

Whether the target is the top-1 token needs no extra state: the target logit is picked from the same
tiles the running max reads, so ``target_logit >= m`` compares equal values exactly at a tie.
Under vocabulary parallelism the partial sums are rescaled to the global max and summed like ``s``.

Backward: ``dH/dz_j = -p_j (log p_j + H) = -p_j (z_j - (lse - H))``, scaled per position by the upstream
gradient of the entropy, joins the logits gradient of each tile.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


class OnlineLSE:
    """Running max and sum-exp of one row block; ``update`` returns exp(z - new_max) and the rescale.

    ``exp_out`` may be ``z`` itself (the tile is then overwritten with its exponentials).
    """

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)

    def update(self, z: torch.Tensor, exp_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        new_max = torch.maximum(self.max, z.amax(dim=1))
        rescale = torch.exp(self.max - new_max)
        e = torch.sub(z, new_max.unsqueeze(1), out=exp_out).exp_()
        self.sum.mul_(rescale).add_(e.sum(dim=1))
        self.max = new_max
        return e, rescale

    def lse(self) -> torch.Tensor:
        return self.max + self.sum.log()


class ExtraSums:
    """The partial sums ``pz``, ``s2``, ``sz`` of some positions (views of a larger set with :meth:`rows`)."""

    def __init__(self, pz: torch.Tensor, s2: torch.Tensor, sz: torch.Tensor):
        self.pz, self.s2, self.sz = pz, s2, sz

    @classmethod
    def zeros(cls, n: int, dtype: torch.dtype, device: torch.device) -> "ExtraSums":
        return cls(*(torch.zeros(n, dtype=dtype, device=device) for _ in range(3)))

    def rows(self, n0: int, n1: int) -> "ExtraSums":
        """Positions ``[n0, n1)``, as views: updating them updates this set."""
        return ExtraSums(self.pz[n0:n1], self.s2[n0:n1], self.sz[n0:n1])

    def update(self, z: torch.Tensor, e: torch.Tensor, rescale: torch.Tensor) -> None:
        """Fold one tile in: logits ``z`` and ``e = exp(z - new max)``, ``rescale = exp(old max - new max)``.

        ``z`` is overwritten (it serves as the scratch buffer of the products)."""
        self.sz.add_(z.sum(dim=1))
        self.pz.mul_(rescale).add_(torch.mul(e, z, out=z).sum(dim=1))
        self.s2.mul_(rescale.square()).add_(torch.mul(e, e, out=z).sum(dim=1))

    def rescaled(self, rescale: torch.Tensor) -> List[torch.Tensor]:
        """Rescale (in place) from this rank's max to the global one; the sums to all-reduce."""
        self.pz.mul_(rescale)
        self.s2.mul_(rescale.square())
        return [self.pz, self.s2, self.sz]

    def finalize(self, names: Tuple[str, ...], m: torch.Tensor, s: torch.Tensor, target_logit: torch.Tensor,
                 vocab: int) -> Dict[str, torch.Tensor]:
        """The requested extras from the (reduced) statistics: ``m``/``s`` the policy's max and sum-exp,
        ``vocab`` the whole vocabulary's size; ``is_top1`` as 0/1 in the compute dtype."""
        log_s = s.log()
        out = {}
        for name in names:
            if name == "entropy":
                out[name] = (m + log_s) - self.pz / s
            elif name == "mean_logits":
                out[name] = self.sz / vocab
            elif name == "is_top1":
                out[name] = (target_logit >= m).to(s.dtype)
            else:
                out[name] = self.s2.log() - 2 * log_s
        return out


def entropy_grad_term(z: torch.Tensor, terms: Tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``g_H * (log p + H) = g_H * (z - (lse - H))`` of a tile into ``out``; ``terms = (g_H, lse - H)``, each
    ``[rows, 1]``. The entropy's logits gradient is ``-p`` times this."""
    grad, shift = terms
    return torch.sub(z, shift, out=out).mul_(grad)


def entropy_rows(grad_entropy: Optional[torch.Tensor], entropy: Optional[torch.Tensor], valid: torch.Tensor,
                 dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(per-position upstream gradient of the entropy, 0 at ignored positions; saved entropy), or (None, None)
    when the entropy has no gradient."""
    if grad_entropy is None or entropy is None:
        return None, None
    return grad_entropy.to(dtype) * valid, entropy.to(dtype)
