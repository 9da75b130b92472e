"""Tile epilogues of the torch backend: where each row's target lies among the vocabulary tiles
(:class:`TargetSlots`), and the elementwise work after each logits GEMM fused into one Inductor-compiled
function (:func:`forward_tile`, :func:`backward_tile`).

Uncompiled, a tile's epilogue is a dozen ATen passes over the tile (max, subtract, exp, sum; in the backward
subtract, exp and the KL / entropy / softcap terms) plus small per-row ops. Compiled by Inductor, which on CPU
emits one vectorized C++ loop nest per row, the forward reads the tile twice per row (max, then the sum of
exponentials, the KL sum and the target pick-up in the same loop) while the row is in L1, and writes nothing;
the backward reads the logits tile(s) once and writes the gradient tile once.

When it is used (``FASTPREF_COMPILE_TILES``): unset or ``0``, never (the default); ``1``, on CPU for every tile;
``auto``, on CPU for tiles of at least :data:`MIN_TILE` entries. Off by default because it did not pay where
it was measured (``bench/results/cpu_profile_torch.md``: 2 Xeon cores, D = 128, V = 32000, 256 x 1024 tiles:
within +-5% of the uncompiled step, DPO/logprobs/VAR/SPO) while each variant costs seconds of compile time
in a fresh process (Inductor caches the C++ on disk). The first failure of a compile or of a compiled call
turns it off for the process, with a warning; the tile is then done uncompiled. Sizes are symbolic
(``dynamic=True``): the ragged last row and vocabulary blocks reuse the same compiled code.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .torch_online import ExtraSums, entropy_grad_term, online_update

ENV = "FASTPREF_COMPILE_TILES"
#: ``auto``: compile only tiles of at least this many entries. Measured on 2 Xeon cores (1 thread, the DPO
#: forward epilogue alone, fp32): no faster than the uncompiled passes at 256 x 1024 (the ~25 us call and
#: Inductor's single-accumulator row reductions eat the saved passes), ~30% faster at 256 x 4096.
MIN_TILE = 1 << 20
_STATE = {"broken": False}
_CACHE: Dict[tuple, object] = {}


class TargetSlots:
    """Per vocabulary tile of one row block, the rows whose target lies in it and the target's column there.

    ``local``: each row's target relative to this vocabulary slice (outside ``[0, vocab)``: not in it). One
    sort per row block replaces a per-tile mask / gather / where over every row."""

    def __init__(self, local: torch.Tensor, vocab: int, block_v: int):
        tiles = -(-vocab // block_v)
        inside = (local >= 0) & (local < vocab)
        tile = torch.where(inside, local.div(block_v, rounding_mode="floor"), tiles)
        self.counts: List[int] = torch.bincount(tile, minlength=tiles + 1).tolist()
        order = torch.argsort(tile, stable=True)
        cols = (local - tile * block_v).index_select(0, order)
        self.rows, self.cols = order.split(self.counts), cols.split(self.counts)

    def get(self, i: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(rows, columns) of the targets in vocabulary tile ``i``, or None when it holds none."""
        return (self.rows[i], self.cols[i]) if self.counts[i] else None


def eager_forward_tile(z: torch.Tensor, r: Optional[torch.Tensor], slot, state: list, kl: Optional[str],
                       diff: Optional[torch.Tensor], exp_out: torch.Tensor, extra: Optional[ExtraSums]) -> tuple:
    """The uncompiled forward epilogue of one tile: the new running statistics (the layout of
    ``torch_backend._forward_block``). ``z``, ``r`` are overwritten; ``diff``: a scratch tile for the KL term;
    ``exp_out``: where the exponentials go (``z`` itself unless the extra sums need ``z`` afterwards)."""
    if slot is not None:  # target logits first: the exponentials below overwrite the tiles in place
        state[2].index_put_((slot[0],), z[slot])
        if r is not None:
            state[5].index_put_((slot[0],), r[slot])
    # forward KL: acc = sum_v exp(z - max) * (z - r), rescaled with the policy's running max;
    # reverse KL: acc = sum_v exp(r - max_r) * (r - z), rescaled with the reference's running max.
    d = torch.sub(z, r, out=diff) if kl == "forward" else (torch.sub(r, z, out=diff) if kl == "reverse" else None)
    e, state[0], state[1], rescale = online_update(z, state[0], state[1], exp_out)
    if extra is not None:
        extra.update(z, e, rescale)  # z is consumed
    if kl == "forward":
        state[6] = state[6].mul_(rescale).add_(d.mul_(e).sum(dim=1))
    if r is not None:
        er, state[3], state[4], rescale_r = online_update(r, state[3], state[4], r)
        if kl == "reverse":
            state[6] = state[6].mul_(rescale_r).add_(d.mul_(er).sum(dim=1))
    return tuple(state)


def eager_grad(z: torch.Tensor, r: Optional[torch.Tensor], g: torch.Tensor, a_blk: torch.Tensor,
               lse_blk: torch.Tensor, terms, kl: Optional[str], scratch: Optional[torch.Tensor]) -> None:
    """The uncompiled elementwise part of ``torch_backend._row_block_grad`` (no one-hot, no softcap slope) into
    ``g``; ``r`` is overwritten; ``scratch``: a tile for the entropy term."""
    kl_terms, ent_terms = terms
    torch.sub(z, lse_blk, out=g).exp_()  # p
    if kl_terms is None and ent_terms is None:
        return
    coef, q = -a_blk, None
    if kl_terms is not None:
        b_blk, ref_lse_blk, shift_blk = kl_terms
        if kl == "forward":
            coef = torch.sub(z, r, out=r).sub_(shift_blk).mul_(b_blk).sub_(a_blk)
        else:
            q = r.sub_(ref_lse_blk).exp_().mul_(b_blk)
            coef = b_blk - a_blk
    if ent_terms is not None:
        coef = entropy_grad_term(z, ent_terms, scratch).neg_().add_(coef)
    g.mul_(coef)
    if q is not None:
        g.sub_(q)


def use_compiled(rows: int, cols: int, device: torch.device) -> bool:
    """Whether a ``[rows, cols]`` tile's epilogue runs compiled (see the module docstring)."""
    mode = os.environ.get(ENV, "0").strip().lower()
    if mode not in ("1", "auto") or _STATE["broken"] or device.type != "cpu":
        return False
    if torch.compiler.is_compiling():  # traced from an outer torch.compile: stay plain ATen
        return False
    return mode == "1" or rows * cols >= MIN_TILE


def _capped(x: torch.Tensor, bias: Optional[torch.Tensor], temperature: float, softcap: Optional[float]):
    """The logits from the raw product, in the uncompiled path's order: softcap(((x + b) / T))."""
    if bias is not None:
        x = x + bias
    if temperature != 1.0:
        x = x / temperature
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x


def _online(z, m, s):
    new_m = torch.maximum(m, z.amax(dim=1))
    rescale = torch.exp(m - new_m)
    e = torch.exp(z - new_m.unsqueeze(1))
    return new_m, s * rescale + e.sum(dim=1), rescale, e


def _pick(z, local, t):
    cols = z.shape[1]
    inside = (local >= 0) & (local < cols)
    picked = z.gather(1, local.clamp(0, cols - 1).unsqueeze(1)).squeeze(1)
    return t + torch.where(inside, picked, torch.zeros_like(picked))


def _forward_fn(x, bias, xr, ref_bias, local, state, *, temperature, softcap, kl):
    """New running statistics ``(max, sum, target[, ref_max, ref_sum, ref_target[, kl_acc]])`` of one tile."""
    m, s, t = state[:3]
    z = _capped(x, bias, temperature, softcap)
    new_m, s, rescale, e = _online(z, m, s)
    out = [new_m, s, _pick(z, local, t)]
    if xr is not None:
        mr, sr, tr = state[3:6]
        r = _capped(xr, ref_bias, temperature, softcap)
        new_mr, sr, rescale_r, er = _online(r, mr, sr)
        out += [new_mr, sr, _pick(r, local, tr)]
        if kl == "forward":
            out.append(state[6] * rescale + (e * (z - r)).sum(dim=1))
        elif kl == "reverse":
            out.append(state[6] * rescale_r + (er * (r - z)).sum(dim=1))
    return tuple(out)


def _backward_fn(x, bias, lse, out, xr, ref_bias, terms, local, *, temperature, softcap, kl, full):
    """Write dL/dz of one tile into ``out`` (as ``torch_backend._row_block_grad`` forms it, without the one-hot
    term); return the softcap slope at each row's target (to scale the one-hot term), or None."""
    a, b, ref_lse, shift, g_ent, ent_shift = terms
    z = _capped(x, bias, temperature, softcap)
    g = torch.exp(z - lse)
    if full:
        coef, q = -a, None
        if kl == "forward":
            coef = ((z - _capped(xr, ref_bias, temperature, softcap)) - shift) * b - a
        elif kl == "reverse":
            q = torch.exp(_capped(xr, ref_bias, temperature, softcap) - ref_lse) * b
            coef = b - a
        if g_ent is not None:
            coef = coef - g_ent * (z - ent_shift)
        g = g * coef
        if q is not None:
            g = g - q
    slope_t = None
    if softcap is not None:
        slope = 1.0 - (z / softcap) ** 2
        g = g * slope
        cols = z.shape[1]
        slope_t = slope.gather(1, local.clamp(0, cols - 1).unsqueeze(1)).squeeze(1)
    out.copy_(g)
    return slope_t


def _compiled(kind: str, flags: dict):
    """One compiled function per (kind, flags): a fresh code object each, so that dynamo's per-code
    recompile limit only ever sees the dtypes and the 0/1 size specializations of one variant."""
    key = (kind, tuple(sorted(flags.items())))
    fn = _CACHE.get(key)
    if fn is None:
        scope = {"fn": _forward_fn if kind == "forward" else _backward_fn, "flags": flags}
        exec("def epilogue(*args):\n    return fn(*args, **flags)\n", scope)  # noqa: S102 (fixed source)
        fn = _CACHE[key] = torch.compile(scope["epilogue"], dynamic=True)
    return fn


def _run(kind: str, flags: dict, args: tuple):
    try:
        with torch.no_grad():
            return True, _compiled(kind, flags)(*args)
    except Exception as exc:  # noqa: BLE001 (any compiler failure: fall back to the plain passes)
        _STATE["broken"] = True
        warnings.warn(f"fastpref: the compiled tile epilogue failed ({type(exc).__name__}: {exc}); using the "
                      f"uncompiled one from now on (set {ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return False, None


def forward_tile(x, bias, xr, ref_bias, local, state: tuple, temperature: float, softcap: Optional[float],
                 kl: Optional[str]):
    """(ok, new state) of one forward tile from the raw products ``x`` (and ``xr``); ok False: not run."""
    return _run("forward", dict(temperature=temperature, softcap=softcap, kl=kl),
                (x, bias, xr, ref_bias, local, state))


def backward_tile(x, bias, lse, out, xr, ref_bias, terms: tuple, local, temperature: float,
                  softcap: Optional[float], kl: Optional[str], full: bool):
    """(ok, softcap slope at the targets or None) after writing one tile's dL/dz (no one-hot) into ``out``."""
    return _run("backward", dict(temperature=temperature, softcap=softcap, kl=kl, full=full),
                (x, bias, lse, out, xr, ref_bias, terms, local))
