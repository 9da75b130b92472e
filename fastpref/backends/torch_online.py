"""Online softmax statistics of the torch backend, tile by tile: the running log-sum-exp
(:func:`online_update`) and the partial sums of the optional per-position outputs (``extra_outputs``).

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
gradient of the entropy, joins the logits gradient of each tile. :class:`Grads` holds the backward's dH / dW /
db buffers and adds each tile's products into them, skipping, with ``KernelOptions.grad_filter``, the rows of
a tile whose non-target entries are all small (:func:`filter_rows`; the criterion and its error bound are in
the ``KernelOptions`` docstring).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .._types import Prepared


def online_update(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, exp_out: torch.Tensor):
    """One tile of a running max ``m`` and sum-exp ``s``: ``(exp(z - new max), new max, new sum, rescale)``;
    ``s`` is updated in place, ``exp_out`` may be ``z`` itself."""
    new_m = torch.maximum(m, z.amax(dim=1))
    rescale = torch.exp(m - new_m)
    e = torch.sub(z, new_m.unsqueeze(1), out=exp_out).exp_()
    return e, new_m, s.mul_(rescale).add_(e.sum(dim=1)), rescale


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


#: The gradient filter's gather threshold: a tile keeping more than this fraction of its rows runs densely (no
#: entry dropped). Below it the kept rows are gathered (a copy of theirs of the tile and of H, cheap next to the
#: two GEMMs they shrink); above it the dropped quarter would not pay for the copies and the extra passes.
DENSE_ABOVE = 0.75


def filter_rows(g: torch.Tensor, limit, local: torch.Tensor, scratch: torch.Tensor, nonneg: bool):
    """The gradient filter on one tile ``g`` (``[rows, cols]``, in the tile's own units): None when the tile is
    to be multiplied densely, else ``(kept, (rows, cols, values))``: the rows to multiply, and the target entries
    ``g[r, c]`` of the other rows (the one-hot term is never dropped). A row is dropped when its non-target
    entries are all ``<= limit`` (a float, or ``[rows, 1]``); ``local``: each row's target column in this tile
    (outside ``[0, cols)``: elsewhere). ``nonneg``: the non-target entries are >= 0 and the target's <= 0 (the
    log-prob-only tile ``(p - onehot) * slope``), so the row maximum decides in one pass. When more than
    :data:`DENSE_ABOVE` of the rows are kept: None (the tile runs densely, nothing dropped)."""
    if nonneg:
        keep = g.amax(dim=1) > limit
    else:
        big = torch.abs(g, out=scratch) > limit
        inside = ((local >= 0) & (local < g.shape[1])).nonzero().squeeze(1)
        big[inside, local.index_select(0, inside)] = False  # target entries do not decide (they are always kept)
        keep = big.any(dim=1)
    kept = keep.nonzero().squeeze(1)
    if kept.numel() > DENSE_ABOVE * g.shape[0]:
        return None
    dropped = ~keep & (local >= 0) & (local < g.shape[1])
    rows = dropped.nonzero().squeeze(1)
    cols = local.index_select(0, rows)
    return kept, (rows, cols, g[rows, cols])


class Grads:
    """dH / dW / db buffers in the compute dtype. Unfiltered, the first row block writes dW/db and the first
    vocabulary block each dH row block (no zero fill of the [V, D] buffer); dH rows of inactive positions stay
    zero. With the gradient filter (``zero``) every buffer starts at zero, since skipped rows only accumulate.
    ``rows_seen`` / ``rows_skipped`` count the (row, vocabulary block) slices the filter looked at / skipped."""

    def __init__(self, prep: Prepared, need: Tuple[bool, bool, bool], all_rows: bool, zero: bool = False):
        cd, device = prep.compute_dtype, prep.hidden.device
        vocab, dim = prep.weight.shape
        need_h, need_w, need_b = need
        new = torch.zeros if zero else torch.empty
        self.hidden = (new if all_rows else torch.zeros)(prep.num_positions, dim, dtype=cd, device=device) \
            if need_h else None
        self.weight = new(vocab, dim, dtype=cd, device=device) if need_w else None
        self.bias = new(vocab, dtype=cd, device=device) if need_b else None
        self.rows_seen = self.rows_skipped = 0

    def add_tile(self, g: torch.Tensor, w_blk: torch.Tensor, h_scaled: torch.Tensor,
                 row_scale: Optional[torch.Tensor], dh_blk: Optional[torch.Tensor], first_row_block: bool,
                 v0: int, v1: int) -> None:
        if dh_blk is not None:
            if v0 == 0:
                torch.mm(g, w_blk.to(g.dtype), out=dh_blk)
            else:
                dh_blk.addmm_(g, w_blk.to(g.dtype))
        if self.weight is not None:
            if first_row_block:
                torch.mm(g.t(), h_scaled, out=self.weight[v0:v1])
            else:
                self.weight[v0:v1].addmm_(g.t(), h_scaled)
        if self.bias is not None:
            col_sums = g.sum(dim=0) if row_scale is None else torch.mv(g.t(), row_scale.squeeze(1))
            if first_row_block:
                self.bias[v0:v1] = col_sums
            else:
                self.bias[v0:v1] += col_sums

    def add_filtered(self, g: torch.Tensor, filtered, w_blk: torch.Tensor, h_scaled: torch.Tensor,
                     row_scale: Optional[torch.Tensor], dh_blk: Optional[torch.Tensor], v0: int, v1: int) -> None:
        """Accumulate the kept rows of ``g`` densely and the dropped rows' target entries (``filter_rows``)."""
        kept, (rows, cols, values) = filtered
        self.rows_skipped += g.shape[0] - kept.numel()
        scale = None if row_scale is None else row_scale.squeeze(1)
        if kept.numel():
            gk = g.index_select(0, kept)
            if dh_blk is not None:  # rows are unique: gather, add, scatter back (CPU index_add_ is slow)
                dh_blk.index_copy_(0, kept, torch.addmm(dh_blk.index_select(0, kept), gk, w_blk.to(g.dtype)))
            if self.weight is not None:
                self.weight[v0:v1].addmm_(gk.t(), h_scaled.index_select(0, kept))
            if self.bias is not None:
                self.bias[v0:v1] += gk.sum(dim=0) if scale is None else torch.mv(gk.t(), scale.index_select(0, kept))
        if rows.numel():
            if dh_blk is not None:  # one target per row: unique rows
                w_rows = w_blk.index_select(0, cols).to(g.dtype)
                dh_blk.index_copy_(0, rows, dh_blk.index_select(0, rows).addcmul_(values.unsqueeze(1), w_rows))
            if self.weight is not None:  # columns may repeat (rows sharing a target): accumulate
                self.weight.index_put_((cols + v0,), values.unsqueeze(1) * h_scaled.index_select(0, rows),
                                       accumulate=True)
            if self.bias is not None:
                self.bias.index_add_(0, cols + v0, values if scale is None else values * scale.index_select(0, rows))
