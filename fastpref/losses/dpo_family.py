"""The DPO family as TRL 1.16's ``DPOTrainer`` computes it: every ``loss_type``, f-divergences, LD-DPO, WPO.

One head, :func:`dpo_family`, covers TRL's ``loss_type`` values (a list combines them with weights, as in
MPO), its ``f_divergence_type`` / ``f_alpha_divergence_coef``, ``label_smoothing``, ``discopop_tau`` and, as
inputs, WPO pair weights and the chosen-token NLL that ``"sft"`` needs. :func:`ld_logps` builds LD-DPO's
per-sequence log-probs from token log-probs; :func:`wpo_sequence_weights` and :func:`chosen_nll` form
the remaining inputs.

Notation (all [B], one entry per pair): S = summed policy log-prob (grad), R = reference (constant),
Δ_w = S_w − R_w and Δ_l = S_l − R_l the log-ratios, f(·) the f-divergence score of a log-ratio
(identity for ``reverse_kl``), δ = f(Δ_w) − f(Δ_l), x = βδ, n the completion length, ls = log σ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .._types import segment_sums_deterministic
from ._common import LossOutput, Tensor, check_finite, check_positive, check_values, floats, logsigmoid, pair_metrics

#: TRL 1.16's ``loss_type`` values, in its order.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
#: TRL's ``f_divergence_type`` values.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The loss types built on the chosen-minus-rejected score, the only ones TRL allows a non-default f with.
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
#: Loss types that sort the batch (their pairs lose their identity, so WPO weights cannot apply).
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
#: TRL clamps (α − 1)·Δ at 80 before exp in float32 (11 in float16); float64 uses the float32 bound.
ALPHA_DIVERGENCE_CLAMP = 80.0

LossTypes = Union[str, Sequence[str]]


@dataclass
class _Pairs:
    """What a per-pair loss reads (all [B] unless noted)."""

    beta: float
    eps: float
    tau: float
    chosen_ratio: Tensor  # Δ_w
    rejected_ratio: Tensor  # Δ_l
    chosen_score: Tensor  # f(Δ_w)
    rejected_score: Tensor  # f(Δ_l)
    logps: Tuple[Tensor, Tensor, Tensor, Tensor]  # S_w, S_l, R_w, R_l
    lengths: Optional[Tuple[Tensor, Tensor]]  # n_w, n_l clamped at 1, or None
    nll: Optional[Tensor]  # 0-d chosen-token NLL, or None
    smooth_sigmoid: bool

    @property
    def x(self) -> Tensor:
        return self.beta * (self.chosen_score - self.rejected_score)

    def averaged_delta(self) -> Tensor:
        nw, nl = self.lengths
        return self.chosen_score / nw - self.rejected_score / nl


def _smoothed(x: Tensor, eps: float) -> Tensor:
    """−(1−ε)·ls(x) − ε·ls(−x) (conservative DPO)."""
    return -logsigmoid(x) * (1 - eps) - logsigmoid(-x) * eps


def _sigmoid(p: _Pairs) -> Tensor:
    x = p.x
    return _smoothed(x, p.eps) if p.smooth_sigmoid else -logsigmoid(x)


def _ipo(p: _Pairs) -> Tensor:
    return (p.averaged_delta() - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> Tensor:
    x = p.x
    eps = torch.tensor(p.eps, dtype=x.dtype, device=x.device)
    return torch.sigmoid(x) * (logsigmoid(x) - torch.log1p(-eps)) + torch.sigmoid(-x) * (logsigmoid(-x) - torch.log(eps))


def _robust(p: _Pairs) -> Tensor:
    x = p.x
    return (-(1 - p.eps) * logsigmoid(x) + p.eps * logsigmoid(-x)) / (1 - 2 * p.eps)


def _nca_pair(p: _Pairs) -> Tensor:
    cw, cl = p.beta * p.chosen_ratio, p.beta * p.rejected_ratio
    return -logsigmoid(cw) - 0.5 * logsigmoid(-cw) - 0.5 * logsigmoid(-cl)


def _bco_pair(p: _Pairs) -> Tensor:
    return -logsigmoid(p.beta * p.chosen_ratio) - logsigmoid(-p.beta * p.rejected_ratio)


def _sppo_hard(p: _Pairs) -> Tensor:
    return (p.chosen_ratio - 0.5 / p.beta) ** 2 + (p.rejected_ratio + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> Tensor:
    sw, sl, rw, rl = p.logps
    delta = torch.sort(sw - sl, dim=0).values - torch.sort(rw - rl, dim=0).values
    return _smoothed(p.beta * delta, p.eps)


def _aot_unpaired(p: _Pairs) -> Tensor:
    delta = torch.sort(p.chosen_ratio, dim=0).values - torch.sort(p.rejected_ratio, dim=0).values
    return _smoothed(p.beta * delta, p.eps)


def _apo_zero(p: _Pairs) -> Tensor:
    return 1 - torch.sigmoid(p.beta * p.chosen_ratio) + torch.sigmoid(p.beta * p.rejected_ratio)


def _apo_down(p: _Pairs) -> Tensor:
    return torch.sigmoid(p.beta * p.chosen_ratio) + (1 - torch.sigmoid(p.beta * (p.chosen_ratio - p.rejected_ratio)))


def _discopop(p: _Pairs) -> Tensor:
    # e^{-x}·σ(x/τ) as exp(−x + ls(x/τ)): equal where TRL's product is finite, and no inf·0 = NaN
    # at very negative x (where TRL's loss is NaN).
    x = p.x
    modulation = torch.sigmoid(x / p.tau)
    return -logsigmoid(x) * (1 - modulation) + torch.exp(logsigmoid(x / p.tau) - x)


def _sft(p: _Pairs) -> Tensor:
    return p.nll.expand(p.chosen_ratio.shape[0])


def _sigmoid_norm(p: _Pairs) -> Tensor:
    return -logsigmoid(p.beta * p.averaged_delta())


_PER_PAIR: Dict[str, Callable[[_Pairs], Tensor]] = {
    "sigmoid": _sigmoid, "hinge": lambda p: torch.relu(1 - p.x), "ipo": _ipo, "exo_pair": _exo_pair,
    "nca_pair": _nca_pair, "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
    "sft": _sft, "sigmoid_norm": _sigmoid_norm,
}
_NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"})


def f_divergence_scores(logratios: Tensor, f_divergence_type: str = "reverse_kl",
                        f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f'(π/π_ref) of the f-DPO paper (Wang et al. 2023, arXiv:2309.16240) as a function of log-ratio u.

    reverse_kl: u (standard DPO); forward_kl: 1 − e^{−u}; js_divergence: log 2 + ls(u);
    alpha_divergence: (e^{min((α−1)u, 80)} − 1)/(α − 1), and u itself when |α − 1| < 1e-6 (TRL's limit case).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:
            return logratios
        t = torch.clamp((a - 1.0) * logratios, max=ALPHA_DIVERGENCE_CLAMP)
        return (torch.exp(t) - 1.0) * (1.0 / (a - 1.0))
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def check_dpo_options(loss_type: LossTypes = "sigmoid", loss_weights: Optional[Sequence[float]] = None, *,
                      beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                      f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
                      use_weighting: bool = False) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """Validate the options of :func:`dpo_family`; return (loss types, weights) as tuples.

    Raises ValueError naming the argument: unknown or empty ``loss_type``, ``loss_weights`` of another
    length, β ≤ 0, τ ≤ 0, an f-divergence with a loss type TRL refuses it for, WPO with a sorting loss
    (``aot``/``aot_unpaired``; TRL raises NotImplementedError there), ε outside [0, 0.5), and ε = 0 with
    ``exo_pair`` (log ε = −inf: TRL refuses it too).
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in _PER_PAIR:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {t!r}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(check_finite("loss_weights", w) for w in loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss_type: got {len(weights)} weights for "
                             f"{len(types)} loss types {types}")
    check_positive("beta", beta)
    check_positive("discopop_tau", discopop_tau)
    check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} applies only to loss types "
                         f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got loss_type={list(types)}")
    if use_weighting and set(types) & SORTING_LOSS_TYPES:
        raise ValueError(f"use_weighting (WPO) cannot weight loss types that sort the batch "
                         f"{sorted(SORTING_LOSS_TYPES)}, got loss_type={list(types)}")
    eps = check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (its loss has log(label_smoothing); "
                         "the EXO paper recommends 1e-3)")
    return types, weights


def dpo_family(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None, *,
               loss_type: LossTypes = "sigmoid", loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
               label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
               f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
               pair_weights: Optional[Tensor] = None, sft_nll: Optional[Tensor] = None,
               smooth_sigmoid: bool = False) -> LossOutput:
    r"""TRL 1.16 ``DPOTrainer``'s loss for ``loss_type`` (one name or a list), from per-pair statistics.

    ``L = Σ_k w_k · mean_b(ℓ_k[b] · c[b])`` over the listed types k with ``loss_weights`` w (default all 1),
    c the WPO ``pair_weights`` (default 1; detached). Per-pair losses (x = βδ, see the module docstring):

    - ``sigmoid``  −ls(x)  (DPO, Rafailov et al. 2023). TRL ignores ε here; ``smooth_sigmoid=True`` gives
      fastpref's conservative form −(1−ε)ls(x) − ε·ls(−x) (cDPO, :func:`fastpref.losses.dpo`).
    - ``hinge``  relu(1 − x)  (SLiC, Zhao et al. 2023).
    - ``ipo``  (δ̄ − 1/(2β))², δ̄ = f(Δ_w)/n_w − f(Δ_l)/n_l  (IPO, Azar et al. 2023, β as τ; the length
      averaging is TRL's, the paper uses sums).
    - ``exo_pair``  σ(x)(ls(x) − log(1−ε)) + σ(−x)(ls(−x) − log ε)  (EXO, Ji et al. 2024, Eq. 16; needs ε > 0).
    - ``nca_pair``  −ls(βΔ_w) − ½ls(−βΔ_w) − ½ls(−βΔ_l)  (NCA, Chen et al. 2024).
    - ``robust``  (−(1−ε)ls(x) + ε·ls(−x)) / (1 − 2ε)  (rDPO, Chowdhury et al. 2024).
    - ``bco_pair``  −ls(βΔ_w) − ls(−βΔ_l)  (BCO, Jung et al. 2024; without BCO's reward shift δ).
    - ``sppo_hard``  (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))²  (SPPO, Wu et al. 2024, hard P ∈ {0, 1}).
    - ``aot``  cDPO(β(sort(S_w − S_l) − sort(R_w − R_l)), ε);  ``aot_unpaired``  cDPO(β(sort(Δ_w) − sort(Δ_l)), ε)
      (AOT, Melnyk et al. 2024: sorted over the batch, so pairs are coupled).
    - ``apo_zero``  1 − σ(βΔ_w) + σ(βΔ_l);  ``apo_down``  σ(βΔ_w) + 1 − σ(β(Δ_w − Δ_l))  (APO, D'Oosterlinck et
      al. 2024, Eqs. 7-8).
    - ``discopop``  −ls(x)(1 − σ(x/τ)) + e^{−x}σ(x/τ)  (DiscoPOP, Chan Lu et al. 2024, Eq. 5; τ =
      ``discopop_tau``), e^{−x}σ(x/τ) evaluated as exp(ls(x/τ) − x).
    - ``sft``  the chosen-token NLL ``sft_nll`` (0-d, differentiable; see :func:`chosen_nll`), same for all b.
    - ``sigmoid_norm``  −ls(βδ̄), δ̄ as for ``ipo``.

    f = ``f_divergence_type`` (:func:`f_divergence_scores`, f-DPO) reaches the types built on δ; TRL and
    this head refuse a non-default f with the others. Lengths (``ipo``, ``sigmoid_norm``) are clamped at 1
    as TRL does (its mask is the unshifted completion mask: the same count when the prompt is not empty).
    Defaults are TRL's: β = 0.1, ε = 0, f = reverse_kl, α = 0.5, τ = 0.05.

    Metrics (TRL's, for every loss type): ``chosen_rewards`` β·Δ_w, ``rejected_rewards`` β·Δ_l (raw log-ratios,
    not f-scores; for ``ipo`` the IPO paper has no β and :func:`fastpref.losses.ipo` reports Δ/n instead),
    their ``reward_margin``, ``reward_accuracy`` (Δ_w-reward > Δ_l-reward), ``chosen_logps``, ``rejected_logps``,
    and with several types ``loss_<type>`` (the unweighted mean of each).

    Departures from TRL: TRL's in-place WPO weighting fails for ``hinge`` (relu's saved output) and ``sft``
    (an expanded tensor); here they are weighted like the rest. TRL's alpha-divergence has no float64
    branch; here float64 uses the float32 clamp.
    """
    types, weights = check_dpo_options(loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing,
                                       f_divergence_type=f_divergence_type,
                                       f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
                                       use_weighting=pair_weights is not None)
    needs_lengths = bool(set(types) & _NEEDS_LENGTHS)
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"chosen_lengths and rejected_lengths are required for loss_type {sorted(_NEEDS_LENGTHS)}")
    if "sft" in types and sft_nll is None:
        raise ValueError("sft_nll (the chosen-token NLL, see chosen_nll) is required for loss_type 'sft'")
    sw, sl, rw, rl, nw, nl, cw = floats(
        (None,), chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths if needs_lengths else None,
        rejected_lengths=rejected_lengths if needs_lengths else None, pair_weights=pair_weights)
    rw, rl = rw.detach(), rl.detach()
    lengths = None
    if needs_lengths:
        check_values((nw >= 0) & (nl >= 0), "chosen_lengths and rejected_lengths must be >= 0")
        lengths = (nw.detach().clamp(min=1.0), nl.detach().clamp(min=1.0))
    nll = None
    if sft_nll is not None:
        if not isinstance(sft_nll, torch.Tensor) or sft_nll.numel() != 1:
            raise ValueError("sft_nll must be a 0-d (one-element) tensor")
        nll = sft_nll.reshape(()).to(sw.dtype)
    ratio_w, ratio_l = sw - rw, sl - rl
    p = _Pairs(beta=float(beta), eps=float(label_smoothing), tau=float(discopop_tau), chosen_ratio=ratio_w,
               rejected_ratio=ratio_l,
               chosen_score=f_divergence_scores(ratio_w, f_divergence_type, f_alpha_divergence_coef),
               rejected_score=f_divergence_scores(ratio_l, f_divergence_type, f_alpha_divergence_coef),
               logps=(sw, sl, rw, rl), lengths=lengths, nll=nll, smooth_sigmoid=smooth_sigmoid)
    loss: Optional[Tensor] = None
    metrics = pair_metrics(sw, sl, beta * ratio_w, beta * ratio_l)
    for name, weight in zip(types, weights):
        per_pair = _PER_PAIR[name](p)
        if cw is not None:
            per_pair = per_pair * cw.detach()
        term = per_pair.mean()
        if len(types) > 1:
            metrics[f"loss_{name}"] = term.detach()
        loss = term * weight if loss is None else loss + term * weight
    return loss, metrics


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """The chosen responses' token-mean NLL, −Σ_b S_w / Σ_b n_w (differentiable in S_w).

    What TRL's ``sft`` loss type computes (``-chosen_per_token_logps[chosen_mask].mean()``) and Liger's
    ``compute_nll_loss`` adds; S_w must be the plain token sums (not LD-weighted, not averaged).
    """
    sw, nw = floats((None,), chosen_logps=chosen_logps, chosen_lengths=chosen_lengths)
    return -sw.sum() / nw.detach().sum()


def wpo_sequence_weights(logps: Tensor, log_sum_sq_probs: Tensor, lengths: Tensor) -> Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, arXiv:2406.11827, Eq. 2, TRL's aligned form), detached.

    w = exp(Σ_t (log π(y_t) − log Σ_v π(v)²) / max(n, 1)) with ``logps`` = Σ_t log π(y_t) and
    ``log_sum_sq_probs`` = Σ_t log Σ_v π(v)² over the sequence's completion tokens; a pair's weight is
    ``w_chosen * w_rejected`` (pass it as ``pair_weights`` to :func:`dpo_family`).
    """
    s, q, n = floats((None,), logps=logps, log_sum_sq_probs=log_sum_sq_probs, lengths=lengths)
    return torch.exp((s.detach() - q.detach()) / n.detach().clamp(min=1.0))


def per_sequence_sums(values: Tensor, *, seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None) -> Tensor:
    """Σ of per-position ``values`` per sequence: padded ``[S, T]`` rows, or packed ``[N]`` with ``seq_ids``.

    Packed sums use ``index_add`` on CPU and the deterministic segmented scan elsewhere (as the op does).
    """
    if seq_ids is None:
        return values.sum(dim=-1)
    if num_seqs is None:
        raise ValueError("num_seqs is required with seq_ids")
    if values.device.type not in ("cpu", "meta"):
        return segment_sums_deterministic(values, seq_ids, num_seqs)
    return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq_ids, values)


def _packed_ranks(valid: Tensor, seq_ids: Tensor, num_seqs: int) -> Tuple[Tensor, Tensor]:
    """(1-based rank of each valid position among its sequence's valid positions in array order, counts)."""
    order = torch.argsort(seq_ids, stable=True)
    ids, v = seq_ids.index_select(0, order), valid.index_select(0, order).long()
    counts = torch.zeros(num_seqs, dtype=torch.long, device=v.device).index_add(0, ids, v)
    before = torch.cumsum(counts, 0) - counts
    ranks_sorted = torch.cumsum(v, 0) - before.index_select(0, ids)
    ranks = torch.empty_like(ranks_sorted).scatter(0, order, ranks_sorted)
    return ranks, counts


def ld_logps(token_logps: Tensor, valid: Tensor, ld_alpha: float, *, seq_ids: Optional[Tensor] = None,
             num_seqs: Optional[int] = None) -> Tensor:
    """LD-DPO's per-sequence log-probs (Liu et al. 2024, "Length Desensitization in DPO", arXiv:2409.06411).

    Pairwise layout (sequence i pairs with i + S/2). For each pair, the first m = min(n_w, n_l) completion
    tokens of each response are the shared part, the rest its tail: ``logp = Σ_shared + ld_alpha · Σ_tail``
    (TRL's ``ld_alpha``, in [0, 1]; 1 gives the plain sum). Differentiable in ``token_logps``; apply it to the
    reference's token log-probs too, as TRL does.

    Padded: ``token_logps`` and ``valid`` (bool, True at completion tokens) ``[S, T]``, tokens counted left
    to right. Packed: ``[N]`` with ``seq_ids`` ``[N]`` and ``num_seqs``, tokens counted in array order.
    """
    alpha = check_finite("ld_alpha", ld_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if valid.dtype != torch.bool or valid.shape != token_logps.shape:
        raise ValueError(f"valid must be a bool tensor of token_logps' shape {tuple(token_logps.shape)}")
    if seq_ids is None:
        if token_logps.dim() != 2:
            raise ValueError(f"padded token_logps must be [S, T], got shape {tuple(token_logps.shape)}")
        ranks = torch.cumsum(valid.long(), dim=1)
        counts = ranks[:, -1] if ranks.shape[1] else torch.zeros_like(ranks[:, 0])
    else:
        if num_seqs is None or token_logps.dim() != 1 or seq_ids.shape != token_logps.shape:
            raise ValueError("packed token_logps must be [N] with seq_ids [N] and num_seqs")
        ranks, counts = _packed_ranks(valid, seq_ids, num_seqs)
    if counts.shape[0] == 0 or counts.shape[0] % 2:
        raise ValueError(f"ld_logps needs an even, non-zero number of sequences, got {counts.shape[0]}")
    half = counts.shape[0] // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)
    limit = shared.unsqueeze(1) if seq_ids is None else shared.index_select(0, seq_ids)
    in_shared = valid & (ranks <= limit)
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    head = per_sequence_sums(torch.where(in_shared, token_logps, zero), seq_ids=seq_ids, num_seqs=num_seqs)
    tail = per_sequence_sums(torch.where(valid & ~in_shared, token_logps, zero), seq_ids=seq_ids, num_seqs=num_seqs)
    return head + alpha * tail
