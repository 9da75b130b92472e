"""Blockwise fused log-probs in plain PyTorch: the CPU path (and a fallback on any device).

Forward, per block of positions: loop over vocabulary blocks, form the logits tile
``h @ W[v0:v1].T`` in a preallocated buffer, fold it into a running max / sum-exp (online
log-sum-exp), pick up the target logit when it falls in the tile, and, with a reference, do the same
for the reference tile plus the running KL accumulator. Only per-position vectors survive a tile.

Backward recomputes the tiles and applies every upstream gradient in one pass:
``dL/dz = a * (onehot - p) + b * dKL/dz`` with ``a = dL/dtoken_logps`` and ``b = dL/dtoken_kl``,
then ``dH += dz @ W``, ``dW += dz^T @ H``, ``db += sum(dz)`` (fp32 accumulation for half inputs).
Positions whose ``a`` and ``b`` are both zero (ignored positions, zero-weight sequences) are skipped.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._types import ForwardOutputs, Prepared
from . import torch_epilogue as epilogue
from .torch_epilogue import TargetSlots
from .torch_online import ExtraSums, Grads, entropy_rows, filter_rows

# Tile sizes. A [BLOCK_N, BLOCK_V] fp32 tile is 4 MiB: big enough for efficient GEMMs on CPU (the
# backward's dW product has K = BLOCK_N), small enough that the few live tiles stay a tiny fraction of
# what the full logits would take. Measured on 2 AMD EPYC cores (DPO fwd+bwd): 5-10% faster than
# 512 x 4096 at D = 128 and ~4% at D = 1024 (narrower vocabulary slices keep the elementwise passes
# and the W slice closer to the cache).
BLOCK_N = 1024
BLOCK_V = 1024
#: The gradient filter's counts of the last backward in this process (``KernelOptions.grad_filter``), for
#: benchmarks and tests: (row, vocabulary block) slices looked at and skipped (0, 0 when the filter was off).
LAST_FILTER_STATS = {"rows_seen": 0, "rows_skipped": 0}


class _Tiles:
    """Preallocated tile buffers, reused across blocks (no allocator churn or page faults per tile)."""

    def __init__(self, count: int, block_n: int, block_v: int, dtype: torch.dtype, device: torch.device):
        self.bufs = [torch.empty(block_n * block_v, dtype=dtype, device=device) for _ in range(count)]

    def get(self, i: int, rows: int, cols: int) -> torch.Tensor:
        return self.bufs[i][: rows * cols].view(rows, cols)


def _logits_tile(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], temperature: float,
                 softcap: Optional[float], out: torch.Tensor) -> torch.Tensor:
    """out = softcap(((h @ w.T) + b) / temperature), in place, in the compute dtype."""
    torch.mm(h, w.t().to(out.dtype), out=out)
    return _finish_tile(out, b, temperature, softcap)


def _finish_tile(out: torch.Tensor, b: Optional[torch.Tensor], temperature: float,
                 softcap: Optional[float]) -> torch.Tensor:
    """The bias, temperature and softcap of ``_logits_tile``, in place on the product ``out``."""
    dtype = out.dtype
    if b is not None:
        out.add_(b.to(dtype))
    if temperature != 1.0:
        out.div_(temperature)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


class _Partials:
    """Per-position softmax statistics over this rank's vocabulary (the whole vocabulary without a group).

    ``max``/``sum``: running max and sum-exp of the policy logits; ``target``: the target logit (0 when
    the target is outside this vocabulary); ``ref_*`` the same for the reference; ``kl_acc``: the KL
    accumulator, relative to the policy max (forward KL) or the reference max (reverse KL); ``extra``: the
    partial sums of the extra outputs (``torch_extras.ExtraSums``), when any is requested.
    """

    def __init__(self, n: int, has_ref: bool, kl: Optional[str], dtype: torch.dtype, device: torch.device,
                 extras: bool = False):
        def new() -> torch.Tensor:
            return torch.empty(n, dtype=dtype, device=device)

        self.max, self.sum, self.target = new(), new(), new()
        self.ref_max, self.ref_sum, self.ref_target = (new(), new(), new()) if has_ref else (None, None, None)
        self.kl_acc = new() if kl else None
        self.extra = ExtraSums.zeros(n, dtype, device) if extras else None

    def all_reduce(self, kl: Optional[str], group) -> None:
        """Combine the slices of a vocabulary-parallel group: global max, then rescaled sums (in place)."""
        import torch.distributed as dist

        has_ref = self.ref_max is not None
        local_max = torch.stack([self.max, self.ref_max]) if has_ref else self.max.unsqueeze(0)
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # Rescale each rank's sums from its local max to the global max before adding them up.
        rescale = torch.exp(local_max - global_max)
        self.sum.mul_(rescale[0])
        sums = [self.sum, self.target]
        if has_ref:
            self.ref_sum.mul_(rescale[1])
            sums += [self.ref_sum, self.ref_target]
        if kl:
            self.kl_acc.mul_(rescale[0] if kl == "forward" else rescale[1])
            sums.append(self.kl_acc)
        if self.extra is not None:
            sums += self.extra.rescaled(rescale[0])
        stacked = torch.stack(sums)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        for dst, src in zip(sums, stacked):
            dst.copy_(src)
        self.max = global_max[0]
        if has_ref:
            self.ref_max = global_max[1]

    def finalize(self, kl: Optional[str], extras: Tuple[str, ...] = (), vocab: int = 0):
        """(token_logps, lse, ref_token_logps, ref_lse, token_kl, extras) from the (reduced) statistics;
        ``extras`` maps the requested names to their values (``vocab``: the whole vocabulary's size)."""
        lse = self.max + self.sum.log()
        ref_token_logps = ref_lse = token_kl = None
        if self.ref_max is not None:
            ref_lse = self.ref_max + self.ref_sum.log()
            ref_token_logps = self.ref_target - ref_lse
        # KL(p||q) = sum p (z - r) - (lse - lse_r) ; KL(q||p) = sum q (r - z) + (lse - lse_r), with
        # lse - lse_r = (m - m_r) + log(s / s_r): one log of a ratio near 1 rather than the difference of
        # two O(log V) logs, whose round-off would dominate a small KL.
        if kl:
            lse_diff = (self.max - self.ref_max) + torch.log(self.sum / self.ref_sum)
            if kl == "forward":
                token_kl = self.kl_acc / self.sum - lse_diff
            else:
                token_kl = self.kl_acc / self.ref_sum + lse_diff
        extra = {} if self.extra is None else self.extra.finalize(extras, self.max, self.sum, self.target, vocab)
        return self.target - lse, lse, ref_token_logps, ref_lse, token_kl, extra


def _forward(prep: Prepared, rows: torch.Tensor, all_rows: bool):
    """Per-position (token_logps, lse, ref_token_logps, ref_lse, token_kl, extras) for positions ``rows``."""
    cd = prep.compute_dtype
    device = prep.hidden.device
    n = rows.numel()
    vocab = prep.vocab_size
    has_ref = prep.ref_hidden is not None
    kl = prep.kl

    hidden = prep.hidden if all_rows else prep.hidden.index_select(0, rows)
    targets = prep.targets if all_rows else prep.targets.index_select(0, rows)
    ref_hidden = None
    if has_ref:
        ref_hidden = prep.ref_hidden if all_rows else prep.ref_hidden.index_select(0, rows)

    want_extras = bool(prep.extra_outputs)
    part = _Partials(n, has_ref, kl, cd, device, want_extras)
    bn, bv = min(BLOCK_N, max(n, 1)), min(BLOCK_V, vocab)
    # Tiles: policy, reference, KL difference, exponentials (with extras); the compiled epilogue needs the first two.
    tiles = _Tiles((3 if kl else (2 if has_ref else 1)) + want_extras, bn, bv, cd, device)
    fused = not want_extras and epilogue.use_compiled(bn, bv, device)
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        hr = ref_hidden[n0:n1].to(cd) if has_ref else None
        extra = part.extra.rows(n0, n1) if want_extras else None
        state, fused = _forward_block(prep, hidden[n0:n1].to(cd), hr, targets[n0:n1], bv, tiles, fused, extra)
        part.max[n0:n1], part.sum[n0:n1], part.target[n0:n1] = state[:3]
        if has_ref:
            part.ref_max[n0:n1], part.ref_sum[n0:n1], part.ref_target[n0:n1] = state[3:6]
        if kl:
            part.kl_acc[n0:n1] = state[-1]
    if prep.vocab_parallel_group is not None:
        part.all_reduce(kl, prep.vocab_parallel_group)
    return part.finalize(kl, prep.extra_outputs, prep.total_vocab)


def _forward_block(prep: Prepared, h: torch.Tensor, hr: Optional[torch.Tensor], tgt: torch.Tensor, bv: int,
                   tiles: _Tiles, fused: bool, extra: Optional[ExtraSums]):
    """(running statistics, fused) of one row block over the vocabulary: ``(max, sum, target[, ref_max, ref_sum,
    ref_target][, kl_acc])``; ``fused``: the tile epilogue runs compiled (False from the first failure on)."""
    rb, cd, vocab, kl, has_ref = h.shape[0], h.dtype, prep.vocab_size, prep.kl, hr is not None
    local = tgt - prep.vocab_offset

    def fresh() -> Tuple[torch.Tensor, ...]:
        return (torch.full((rb,), float("-inf"), dtype=cd, device=h.device),
                torch.zeros(rb, dtype=cd, device=h.device), torch.zeros(rb, dtype=cd, device=h.device))

    state = fresh() + (fresh() if has_ref else ()) + ((torch.zeros(rb, dtype=cd, device=h.device),) if kl else ())
    slots = None if fused else TargetSlots(local, vocab, bv)
    for i, v0 in enumerate(range(0, vocab, bv)):
        v1 = min(v0 + bv, vocab)
        b, rbias = (None if t is None else t[v0:v1] for t in (prep.bias, prep.ref_bias))
        # The raw products (bias, temperature and softcap come in the epilogue).
        z = _logits_tile(h, prep.weight[v0:v1], None, 1.0, None, tiles.get(0, rb, v1 - v0))
        r = _logits_tile(hr, prep.ref_weight[v0:v1], None, 1.0, None, tiles.get(1, rb, v1 - v0)) if has_ref else None
        if fused:
            fused, new = epilogue.forward_tile(z, b, r, rbias, local - v0, state, prep.temperature, prep.softcap, kl)
            if fused:
                state = new
                continue
            slots = TargetSlots(local, vocab, bv)  # the compiler failed: this tile and the rest run uncompiled
        z = _finish_tile(z, b, prep.temperature, prep.softcap)
        r = None if r is None else _finish_tile(r, rbias, prep.temperature, prep.softcap)
        diff = tiles.get(2, rb, v1 - v0) if kl else None
        exp_out = tiles.get(len(tiles.bufs) - 1, rb, v1 - v0) if extra is not None else z
        state = epilogue.eager_forward_tile(z, r, slots.get(i), list(state), kl, diff, exp_out, extra)
    return state, fused


def _scatter_rows(values: Optional[torch.Tensor], rows: torch.Tensor, n: int, all_rows: bool):
    """Place per-active-row values into a zeroed [n] vector (identity when every row is active)."""
    if values is None:
        return None
    if all_rows:
        return values
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


def _row_block_grad(prep: Prepared, h: torch.Tensor, hr: Optional[torch.Tensor], tgt: Tuple, a_blk: torch.Tensor,
                    lse_blk: torch.Tensor, terms, v0: int, v1: int, tiles: _Tiles, fused: bool):
    """(dL/dz for one [rows, v1 - v0] tile, up to the per-row factor the caller applies to the operands; fused).

    ``tgt = (slot, local)``: the tile's targets (``TargetSlots.get``) and each row's target relative to this
    vocabulary slice; ``terms = (kl_terms, ent_terms)``. Without KL and entropy the tile is ``p - onehot`` (the
    factor ``-a / T`` is applied to the GEMM operands); otherwise it is the full gradient (factor ``1 / T``):
    ``p * c + a * onehot`` with ``c = -a`` plus, with ``kl_terms = (b, ref_lse, shift)``,
    ``b * ((z - r) - shift)`` (forward KL) or ``b - b * q / p`` (reverse KL), and with
    ``ent_terms = (g_H, lse - H)`` the entropy's ``-g_H * (z - (lse - H))``. ``fused``: the elementwise part runs
    compiled (``torch_epilogue``); it comes back False when the compiler failed (this tile then ran uncompiled).
    """
    (kl_terms, ent_terms), (slot, local) = terms, tgt
    rb, cols = h.shape[0], v1 - v0
    b, rbias = (None if t is None else t[v0:v1] for t in (prep.bias, prep.ref_bias))
    z = _logits_tile(h, prep.weight[v0:v1], None, 1.0, None, tiles.get(0, rb, cols))  # the raw products
    r = _logits_tile(hr, prep.ref_weight[v0:v1], None, 1.0, None, tiles.get(2, rb, cols)) if kl_terms is not None \
        else None
    g = tiles.get(1, rb, cols)
    full = kl_terms is not None or ent_terms is not None
    slope_t = None
    if fused:
        flat = (a_blk,) + (kl_terms or (None,) * 3) + (ent_terms or (None,) * 2)
        fused, slope_t = epilogue.backward_tile(z, b, lse_blk, g, r, rbias, flat,
                                                None if prep.softcap is None else local - v0, prep.temperature,
                                                prep.softcap, prep.kl if kl_terms is not None else None, full)
    if not fused:
        z = _finish_tile(z, b, prep.temperature, prep.softcap)
        r = None if r is None else _finish_tile(r, rbias, prep.temperature, prep.softcap)
        scratch = tiles.get(2 + (kl_terms is not None), rb, cols) if ent_terms is not None else None
        epilogue.eager_grad(z, r, g, a_blk, lse_blk, terms, prep.kl, scratch)
    if slot is not None:  # the target's onehot: + a at (i, target_i) (-1 in the unscaled tile p - onehot)
        onehot = a_blk.squeeze(1).index_select(0, slot[0]) if full else g.new_full((slot[0].numel(),), -1.0)
        if slope_t is not None:  # the compiled tile is already scaled by the softcap's slope: scale this entry too
            onehot = onehot * slope_t.index_select(0, slot[0])
        g.index_put_(slot, onehot, accumulate=True)
    if prep.softcap is not None and slope_t is None:
        # d(c * tanh(u / c))/du = 1 - (z / c)^2, with z the capped logits.
        g.mul_(z.div_(prep.softcap).square_().neg_().add_(1.0))
    return g, fused


def backward(prep: Prepared, lse: torch.Tensor, ref_lse: Optional[torch.Tensor], token_kl: Optional[torch.Tensor],
             grad_logps: torch.Tensor, grad_kl: Optional[torch.Tensor], need: Tuple[bool, bool, bool], *,
             entropy: Optional[torch.Tensor] = None, grad_entropy: Optional[torch.Tensor] = None):
    """(dH, dW, db) in the compute dtype from the upstream per-position gradients ``grad_logps`` (of
    ``token_logps``), ``grad_kl`` (of ``token_kl``) and ``grad_entropy`` (of the saved ``entropy``); None
    where ``need`` says so."""
    cd = prep.compute_dtype
    a = grad_logps.to(cd) * prep.valid
    b = grad_kl.to(cd) * prep.valid if (prep.kl and grad_kl is not None) else None
    ent = entropy_rows(grad_entropy, entropy, prep.valid, cd)
    active = a != 0 if b is None else (a != 0) | (b != 0)
    if ent[0] is not None:
        active = active | (ent[0] != 0)
    rows = active.nonzero().squeeze(1)
    n = rows.numel()
    all_rows = n == prep.num_positions
    threshold = prep.options.filter_threshold(prep.hidden.dtype, "torch")
    grads = Grads(prep, need, all_rows, zero=threshold is not None)
    if n == 0:
        for t in (grads.hidden, grads.weight, grads.bias):
            if t is not None:
                t.zero_()
    else:
        _backward_rows(prep, rows, all_rows, a, b, lse, ref_lse, token_kl, grads, ent, threshold)
    LAST_FILTER_STATS.update(rows_seen=grads.rows_seen, rows_skipped=grads.rows_skipped)
    if grads.hidden is not None and prep.vocab_parallel_group is not None:
        _all_reduce_sum(grads.hidden, prep.vocab_parallel_group)  # every rank of the group joins
    return grads.hidden, grads.weight, grads.bias


def _backward_rows(prep: Prepared, rows: torch.Tensor, all_rows: bool, a: torch.Tensor, b: Optional[torch.Tensor],
                   lse: torch.Tensor, ref_lse: Optional[torch.Tensor], token_kl: Optional[torch.Tensor],
                   grads: Grads, ent: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
                   threshold: Optional[float] = None) -> None:
    """Recompute the tiles of the active ``rows`` and accumulate their gradients into ``grads``;
    ``ent``: (upstream gradient of the entropy, saved entropy), or Nones; ``threshold``: the gradient filter's."""
    cd, device = prep.compute_dtype, prep.hidden.device
    vocab, dim = prep.weight.shape
    n = rows.numel()

    def take(t: torch.Tensor) -> torch.Tensor:
        """The active rows of a per-position tensor (no copy when every position is active)."""
        return t if all_rows else t.index_select(0, rows)

    hidden, targets, a, lse = take(prep.hidden), take(prep.targets), take(a), take(lse)
    use_ref = b is not None
    if use_ref:
        b, ref_hidden, ref_lse = take(b), take(prep.ref_hidden), take(ref_lse)
        # dKL(p||q)/dz = p * ((z - lse) - (r - lse_r) - KL) = p * ((z - r) - shift)
        shift = lse - ref_lse + take(token_kl) if prep.kl == "forward" else None
    use_ent = ent[0] is not None
    if use_ent:  # dH/dz = -p (z - (lse - H)), scaled by the entropy's upstream gradient
        g_ent, ent_shift = take(ent[0]), lse - take(ent[1])

    # The filter's bound on a tile entry, in the tile's units: the log-prob-only tile p - onehot leaves the
    # row factor -a / T to the operands (|dz| <= t |a| / T is |tile| <= t); the full tile is dz * T.
    limit, row_scale_only = threshold, not (use_ref or use_ent)
    if threshold is not None and not row_scale_only:
        limit = threshold * (a.abs() + (b.abs() if use_ref else 0.0) + (g_ent.abs() if use_ent else 0.0))
    bn, bv = min(BLOCK_N, n), min(BLOCK_V, vocab)
    tiles = _Tiles(2 + use_ref + use_ent + (threshold is not None), bn, bv, cd, device)
    fused = epilogue.use_compiled(bn, bv, device)
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        h = hidden[n0:n1].to(cd)
        a_blk = a[n0:n1].unsqueeze(1)
        kl_terms = hr = None
        if use_ref:
            hr = ref_hidden[n0:n1].to(cd)
            kl_terms = (b[n0:n1].unsqueeze(1), ref_lse[n0:n1].unsqueeze(1),
                        None if shift is None else shift[n0:n1].unsqueeze(1))
        ent_terms = (g_ent[n0:n1].unsqueeze(1), ent_shift[n0:n1].unsqueeze(1)) if use_ent else None
        # Per-row factors commute with the GEMMs: apply them to the [rows, D] operands (h for dW, the
        # accumulated dH) instead of the [rows, BLOCK_V] tile. Without KL and entropy the tile is then
        # just p - onehot.
        row_scale = -a_blk if not (use_ref or use_ent) else None  # [rows, 1] or None
        if prep.temperature != 1.0:
            ones = torch.ones(n1 - n0, 1, dtype=cd, device=device)
            row_scale = (ones if row_scale is None else row_scale) / prep.temperature
        h_scaled = h if row_scale is None else h * row_scale
        dh_blk = None
        if grads.hidden is not None:  # every row active: dH is written in place
            dh_blk = grads.hidden[n0:n1] if all_rows else \
                (torch.empty if threshold is None else torch.zeros)(n1 - n0, dim, dtype=cd, device=device)
        lse_blk = lse[n0:n1].unsqueeze(1)
        local = targets[n0:n1] - prep.vocab_offset
        slots = TargetSlots(local, vocab, bv)
        for i, v0 in enumerate(range(0, vocab, bv)):
            v1 = min(v0 + bv, vocab)
            g, fused = _row_block_grad(prep, h, hr, (slots.get(i), local), a_blk, lse_blk, (kl_terms, ent_terms),
                                       v0, v1, tiles, fused)
            filtered = None
            if threshold is not None:
                grads.rows_seen += n1 - n0
                limit_blk = limit if isinstance(limit, float) else limit[n0:n1].unsqueeze(1)
                filtered = filter_rows(g, limit_blk, targets[n0:n1] - (prep.vocab_offset + v0),
                                       tiles.get(len(tiles.bufs) - 1, n1 - n0, v1 - v0), nonneg=row_scale_only)
            if filtered is None:
                grads.add_tile(g, prep.weight[v0:v1], h_scaled, row_scale, dh_blk, n0 == 0, v0, v1)
            else:
                grads.add_filtered(g, filtered, prep.weight[v0:v1], h_scaled, row_scale, dh_blk, v0, v1)
        if dh_blk is not None:
            if row_scale is not None:
                dh_blk.mul_(row_scale)
            if not all_rows:
                grads.hidden.index_copy_(0, rows[n0:n1], dh_blk)


def _all_reduce_sum(t: torch.Tensor, group) -> None:
    """dH is a sum over the vocabulary: each rank of the group holds the part from its slice."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def forward(prep: Prepared) -> ForwardOutputs:
    """Forward over the valid positions only; ignored positions get 0 (and lse 0, never read)."""
    n = prep.num_positions
    all_rows = bool(prep.valid.all()) if n > 0 else True
    rows = torch.arange(n, device=prep.hidden.device) if all_rows else prep.valid.nonzero().squeeze(1)
    *outs, extras = _forward(prep, rows, all_rows)
    token_logps, lse, ref_token_logps, ref_lse, token_kl = (_scatter_rows(o, rows, n, all_rows) for o in outs)
    return ForwardOutputs(token_logps=token_logps, lse=lse, ref_token_logps=ref_token_logps, ref_lse=ref_lse,
                          token_kl=token_kl, **{k: _scatter_rows(v, rows, n, all_rows) for k, v in extras.items()})
