"""Fused loss modules (API.md §3): drop-in ``torch.nn.Module`` losses for preference trainers.

Every module has the same call shape, LM-head weight first::

    out = loss_fn(weight, hidden, targets, *, bias=None,
                  ref_hidden=None, ref_weight=None, ref_bias=None,   # reference from hidden states ...
                  ref_logps=None,                                      # ... or precomputed per-sequence
                  seq_ids=None, num_seqs=None,                         # packed [N, D] input
                  **loss_specific)
    out.loss, out.metrics          # also: loss, metrics = out

and does three things: one :func:`fastpref.fused_logprobs` call (the policy, plus the reference in
the same pass when ``ref_hidden`` is given and ``ref_logps`` is not), a split of the per-sequence
statistics by the loss's sequence layout, and the loss head from :mod:`fastpref.losses`. The backward
is the fused op's, so the ``[positions x vocab]`` logits never exist, forward or backward.

Sequence layouts (padded ``[S, T, D]`` rows, or packed ``[N, D]`` positions with ``seq_ids``):

- pairwise (DPO, IPO, SimPO, SLiC, DPOP, ORPO, CPO, alpha-DPO, SPO pairs): sequences ``0..S/2-1``
  are chosen, ``S/2..S-1`` rejected; sequence ``i`` pairs with ``i + S/2``.
- grouped (MC-PO, SPO best-of-n / ranked): ``S = B * G``, group-major: sequence ``b * G + g``;
  for MC-PO ``g = 0`` is the preferred response.
- VAR: ``S = B``, one response per prompt.
- KTO: ``S`` unpaired sequences and ``labels`` ``[S]`` bool (True = desirable).

Hyper-parameters are constructor arguments; ``temperature``, ``softcap``, ``ignore_index``,
``backend`` and ``vocab_parallel_group`` (a vocabulary-sharded LM head, see
:func:`fastpref.fused_logprobs`) are passed to the fused op. ``fastpref.reference`` has an eager twin
of every class here (same names and signatures, full logits); the twins differ only in
:attr:`FusedLossBase.fused_logprobs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import losses
from ._types import LogprobStats
from ._checks import check_positive
from .ops import fused_logprobs as _fused_logprobs

Tensor = torch.Tensor
Metrics = Dict[str, Tensor]

__all__ = [
    "LossOutput",
    "FusedLossBase",
    "FusedDPOLoss",
    "FusedIPOLoss",
    "FusedSimPOLoss",
    "FusedSLiCLoss",
    "FusedDPOPLoss",
    "FusedKTOLoss",
    "FusedORPOLoss",
    "FusedCPOLoss",
    "FusedVARLoss",
    "FusedAlphaDPOLoss",
    "FusedMCPOLoss",
    "FusedSPOLoss",
    "var_cross_pair_ref_logps",
]


@dataclass
class LossOutput:
    """What every fused module returns: ``loss`` (scalar) and ``metrics`` (detached tensors).

    Unpacks like a tuple: ``loss, metrics = loss_fn(...)``.
    """

    loss: Tensor
    metrics: Metrics = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        return iter((self.loss, self.metrics))


@dataclass
class SequenceBatch:
    """One call's per-sequence statistics plus what a loss needs for extra fused passes."""

    stats: LogprobStats  # policy statistics of the S sequences (logps carries the graph)
    ref_logps: Optional[Tensor]  # [S] (VAR: [S] or [S, S]) reference log-probs, no grad; None if unused
    weight: Tensor
    bias: Optional[Tensor]
    ref_weight: Optional[Tensor]
    ref_bias: Optional[Tensor]

    @property
    def logps(self) -> Tensor:
        return self.stats.logps

    @property
    def lengths(self) -> Tensor:
        return self.stats.lengths

    @property
    def num_seqs(self) -> int:
        return self.stats.logps.shape[0]


# ---------------------------------------------------------------------------------------------------
# helpers


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _stats_contributes(replica_group: Optional[object]) -> bool:
    """Whether this rank's values enter a statistic deduplicated over ``replica_group`` (its rank 0 only)."""
    return replica_group is None or torch.distributed.get_rank(replica_group) == 0


def gather_across_ranks(values: Tensor, *, group: Optional[object] = None,
                        replica_group: Optional[object] = None) -> Tensor:
    """Concatenate a 1-D tensor over the ranks of ``group`` (default: the world); sizes may differ per rank.

    Used for the batch statistics that the papers compute on the global batch (alpha-DPO's margin
    statistics, KTO's z0). The result is detached and identical on every rank of ``group``; identity
    when torch.distributed is not initialized.

    ``replica_group``: ranks that hold the *same* batch (a vocabulary-parallel group: every rank of it
    makes the same call on the same sequences). Only its rank 0 contributes, so each distinct batch is
    counted once; without it a vocabulary-parallel group of size n would enter every value n times
    (same mean, a smaller unbiased std). Every rank of ``group`` must call (a collective).
    """
    values = values.detach().reshape(-1)
    if not _is_distributed():
        return values
    dist = torch.distributed
    world = dist.get_world_size(group)
    if not _stats_contributes(replica_group):
        values = values[:0]
    if world == 1:
        return values
    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:
        return values
    # all_gather needs equal shapes: pad to the largest rank, then trim.
    padded = values.new_zeros(max(counts))
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def global_mean(local_mean: Tensor, count: int, *, group: Optional[object] = None,
                replica_group: Optional[object] = None) -> Tensor:
    """Mean over the ranks of ``group`` (default: the world) of per-rank means of ``count`` items each.

    Identity when torch.distributed is not initialized. ``replica_group``: as in
    :func:`gather_across_ranks`, ranks holding the same batch, counted once (its rank 0 contributes).
    """
    local_mean = local_mean.detach()
    if not _is_distributed() or torch.distributed.get_world_size(group) == 1:
        return local_mean
    weight = float(count) if _stats_contributes(replica_group) else 0.0
    flat = local_mean.reshape(-1).double()
    total = torch.cat([flat * weight if weight else torch.zeros_like(flat),
                       torch.tensor([weight], dtype=torch.float64, device=local_mean.device)])
    torch.distributed.all_reduce(total, group=group)
    return (total[:-1] / total[-1]).to(local_mean.dtype).reshape(local_mean.shape)


def _check_stats_group(stats_group: Optional[object]) -> Optional[object]:
    if stats_group is None or stats_group == "local":
        return stats_group
    if isinstance(stats_group, str):
        raise ValueError(f"stats_group must be None, 'local' or a torch.distributed process group, got {stats_group!r}")
    process_group = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() else None
    if process_group is None or not isinstance(stats_group, process_group):
        raise TypeError("stats_group must be None, 'local' or a torch.distributed process group, got "
                        f"{type(stats_group).__name__}")
    return stats_group


def _check_group_size(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_stat(name: str, value: Tensor, like: Tensor, shapes: Sequence[Tuple[int, ...]]) -> Tensor:
    """Validate a user-supplied per-sequence statistic; return it detached in ``like``'s dtype/device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if tuple(value.shape) not in [tuple(s) for s in shapes]:
        allowed = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"{name} must have shape {allowed}, got {tuple(value.shape)}")
    return value.detach().to(dtype=like.dtype, device=like.device)


def _split_pairs(values: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise layout: the first half is chosen, the second half rejected."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def _check_pairwise(num_seqs: int) -> None:
    if num_seqs == 0 or num_seqs % 2:
        raise ValueError(
            f"pairwise losses need an even, non-zero number of sequences (first half chosen, second half "
            f"rejected), got num_seqs={num_seqs}"
        )


def _check_grouped(num_seqs: int, group_size: int) -> int:
    if num_seqs == 0 or num_seqs % group_size:
        raise ValueError(
            f"grouped layout needs num_seqs = B * group_size (sequence b * G + g); got num_seqs={num_seqs}, "
            f"group_size={group_size}"
        )
    return num_seqs // group_size


# ---------------------------------------------------------------------------------------------------
# base class


class FusedLossBase(nn.Module):
    """Shared machinery of the fused loss modules (see the module docstring for the call shape).

    Subclasses set :attr:`reference_mode` and implement :meth:`compute_loss`; the eager twins in
    ``fastpref.reference`` override only :attr:`fused_logprobs`.

    Distributed options (every module accepts them):

    - ``vocab_parallel_group``: a process group over which the LM head is split by vocabulary rows
      (see :func:`fastpref.fused_logprobs`); every rank of it makes the same call on the same batch.
    - ``stats_group``: where global-batch statistics (alpha-DPO's margin EMA, KTO's z0, SPO's weight
      baseline) are collected when torch.distributed is initialized. ``None`` (default): the whole
      world, each distinct batch counted once -- with a ``vocab_parallel_group``, only that group's
      rank 0 contributes, since its other ranks hold copies of the same batch (counting them would
      leave means unchanged but shrink alpha-DPO's unbiased std). A process group (typically the
      data-parallel group): gathered over it, every member contributing, so its members must hold
      different batches. ``"local"``: this rank's batch only, no communication.
    """

    #: The per-sequence log-prob op (the fused one here; ``fastpref.reference`` swaps in the eager one).
    fused_logprobs: Callable[..., LogprobStats] = staticmethod(_fused_logprobs)
    #: "required": needs ``ref_hidden`` or ``ref_logps``; "optional": may use them; "none": rejects them.
    reference_mode: str = "required"
    #: True when ``ref_weight``/``ref_bias`` also serve an extra pass (SPO's online samples, KTO's
    #: mismatched pairs), so they are accepted without ``ref_hidden``.
    extra_pass_reads_ref_head: bool = False

    def __init__(self, *, temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                 backend: str = "auto", vocab_parallel_group: Optional[object] = None,
                 stats_group: Optional[object] = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.softcap = softcap
        self.ignore_index = ignore_index
        self.backend = backend
        # Vocabulary-parallel LM head (see fastpref.fused_logprobs): ``weight``/``bias`` (and the
        # reference head) are this rank's vocabulary slice; every rank of the group makes the same call
        # with the same hidden states, targets and loss-specific inputs (MC-PO: its negatives are
        # broadcast from the group's rank 0).
        self.vocab_parallel_group = vocab_parallel_group
        # Where global-batch statistics (alpha-DPO's margin EMA, KTO's z0, SPO's weight baseline) are
        # collected, when torch.distributed is initialized:
        # - None (default): the whole world, each distinct batch once: with a vocab_parallel_group only
        #   the group's rank 0 contributes (its other ranks hold the same batch), so any layout of
        #   data-parallel x vocabulary-parallel ranks gives the statistics of the global batch;
        # - a process group (e.g. the data-parallel group): that group, every member contributing (its
        #   members must hold different batches);
        # - "local": this rank's batch only, no communication.
        self.stats_group = _check_stats_group(stats_group)

    # -- fused passes --------------------------------------------------------------------------------

    def logprob_options(self) -> dict:
        """Keyword arguments every fused_logprobs call of this module shares."""
        options = dict(temperature=self.temperature, softcap=self.softcap, ignore_index=self.ignore_index,
                       backend=self.backend)
        if self.vocab_parallel_group is not None:
            options["vocab_parallel_group"] = self.vocab_parallel_group
        return options

    def gather_statistic(self, values: Tensor) -> Tensor:
        """``values`` (1-D, detached) concatenated over the ranks that ``stats_group`` selects."""
        if self.stats_group == "local":
            return values.detach().reshape(-1)
        replicas = self.vocab_parallel_group if self.stats_group is None else None
        return gather_across_ranks(values, group=self.stats_group, replica_group=replicas)

    def mean_statistic(self, local_mean: Tensor, count: int) -> Tensor:
        """Mean of per-rank means of ``count`` items over the ranks that ``stats_group`` selects."""
        if self.stats_group == "local":
            return local_mean.detach()
        replicas = self.vocab_parallel_group if self.stats_group is None else None
        return global_mean(local_mean, count, group=self.stats_group, replica_group=replicas)

    def ref_logps_shapes(self, num_seqs: int) -> List[Tuple[int, ...]]:
        """Accepted shapes of a user-supplied ``ref_logps``."""
        return [(num_seqs,)]

    def run_logprobs(self, weight: Tensor, hidden: Tensor, targets: Tensor, *, bias: Optional[Tensor],
                     ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                     ref_logps: Optional[Tensor], seq_ids: Optional[Tensor], num_seqs: Optional[int]) -> SequenceBatch:
        """One fused pass: policy statistics, plus reference log-probs when ``ref_hidden`` is given."""
        self._check_reference_args(ref_hidden, ref_weight, ref_bias, ref_logps)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        stats = self.fused_logprobs(
            hidden, weight, targets, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs,
            ref_hidden=ref_hidden, ref_weight=None if ref_hidden is None else ref_weight,
            ref_bias=None if ref_hidden is None else ref_bias, **self.logprob_options(),
        )
        if ref_hidden is not None:
            ref = stats.ref_logps
        elif ref_logps is not None:
            ref = _as_stat("ref_logps", ref_logps, stats.logps, self.ref_logps_shapes(stats.logps.shape[0]))
        else:
            ref = None
        return SequenceBatch(stats=stats, ref_logps=ref, weight=weight, bias=bias, ref_weight=ref_weight,
                             ref_bias=ref_bias)

    def _check_reference_args(self, ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
                              ref_bias: Optional[Tensor], ref_logps: Optional[Tensor]) -> None:
        name = type(self).__name__
        if ref_hidden is not None and ref_logps is not None:
            raise ValueError(f"{name}: pass either ref_hidden (computed here) or ref_logps (precomputed), not both")
        if self.reference_mode == "none" and (ref_hidden is not None or ref_logps is not None):
            raise ValueError(f"{name} uses no reference model: ref_hidden and ref_logps must be None")
        if self.reference_mode == "required" and ref_hidden is None and ref_logps is None:
            raise ValueError(f"{name} needs the reference model: pass ref_hidden (and optionally ref_weight/"
                             "ref_bias) or precomputed per-sequence ref_logps")
        if (ref_weight is not None or ref_bias is not None) and ref_hidden is None and not self.extra_pass_reads_ref_head:
            raise ValueError(f"{name}: ref_weight/ref_bias are the reference head for ref_hidden, which was not given")

    def extra_logprobs(self, batch: SequenceBatch, hidden: Tensor, targets: Tensor, *, seq_ids: Optional[Tensor],
                       num_seqs: Optional[int], ref_hidden: Optional[Tensor] = None, kl: Optional[str] = None,
                       ) -> LogprobStats:
        """A second fused pass on other sequences (online samples, mismatched pairs) with this call's heads."""
        return self.fused_logprobs(
            hidden, batch.weight, targets, bias=batch.bias, seq_ids=seq_ids, num_seqs=num_seqs,
            ref_hidden=ref_hidden, ref_weight=None if ref_hidden is None else batch.ref_weight,
            ref_bias=None if ref_hidden is None else batch.ref_bias, kl=kl, **self.logprob_options(),
        )

    # -- the call ------------------------------------------------------------------------------------

    def forward(self, weight: Tensor, hidden: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, **loss_specific) -> LossOutput:
        """Loss of one batch; see the class docstring for the loss-specific keyword arguments."""
        batch = self.run_logprobs(weight, hidden, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  ref_bias=ref_bias, ref_logps=ref_logps, seq_ids=seq_ids, num_seqs=num_seqs)
        loss, metrics = self.compute_loss(batch, **loss_specific)
        return self.finish(batch, loss, metrics)

    def finish(self, batch: SequenceBatch, loss: Tensor, metrics: Metrics) -> LossOutput:
        metrics = dict(metrics)
        metrics.setdefault("logps", batch.logps.detach())
        return LossOutput(loss=loss, metrics=metrics)

    def compute_loss(self, batch: SequenceBatch, **loss_specific) -> Tuple[Tensor, Metrics]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())

    def hyperparameters(self) -> dict:
        skip = {"training"}
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and k not in skip and not isinstance(v, (torch.Tensor, torch.Generator))}


class _PairwiseLoss(FusedLossBase):
    """Pairwise layout: sequence i (chosen) pairs with sequence i + S/2 (rejected)."""

    def pairs(self, batch: SequenceBatch):
        """(chosen, rejected) splits of logps, ref_logps and lengths."""
        _check_pairwise(batch.num_seqs)
        chosen, rejected = _split_pairs(batch.logps)
        ref_chosen, ref_rejected = _split_pairs(batch.ref_logps) if batch.ref_logps is not None else (None, None)
        len_chosen, len_rejected = _split_pairs(batch.lengths)
        return chosen, rejected, ref_chosen, ref_rejected, len_chosen, len_rejected


# ---------------------------------------------------------------------------------------------------
# pairwise baselines


class FusedDPOLoss(_PairwiseLoss):
    r"""DPO (Rafailov et al. 2023, arXiv:2305.18290), fused.

    With h = (S_w - R_w) - (S_l - R_l) (summed log-probs, policy S, reference R) and label smoothing eps:
    ``loss = mean[-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)]``.

    Needs the reference: ``ref_hidden`` (computed in the same fused pass) or ``ref_logps`` [S].
    Equal to Liger-Kernel's ``LigerFusedLinearDPOLoss`` (default ``loss_type="sigmoid"``, summed
    log-probs) at ``label_smoothing=0``; our ``label_smoothing`` is the cDPO form without Liger's
    ``robust`` 1/(1-2 eps) rescaling.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **options) -> None:
        super().__init__(**options)
        self.beta, self.label_smoothing = beta, label_smoothing

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, _, _ = self.pairs(batch)
        return losses.dpo(c, r, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing)


class FusedIPOLoss(_PairwiseLoss):
    r"""IPO (Azar et al. 2023, arXiv:2310.12036), fused.

    ``loss = mean[(h - 1/(2 tau))^2]`` with h the DPO log-ratio margin; by default (``length_normalize``,
    as TRL and the alpha-DPO code) built from length-averaged log-probs S/n and R/n. Needs the reference.
    """

    def __init__(self, tau: float = 0.1, length_normalize: bool = True, **options) -> None:
        super().__init__(**options)
        self.tau, self.length_normalize = tau, length_normalize

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, lc, lr = self.pairs(batch)
        return losses.ipo(c, r, rc, rr, lc, lr, tau=self.tau, length_normalize=self.length_normalize)


class FusedSimPOLoss(_PairwiseLoss):
    r"""SimPO (Meng et al. 2024, arXiv:2405.14734), fused; reference-free.

    ``u = beta (S_w/n_w - S_l/n_l) - gamma``, ``loss = mean[-log sigma(u)] - sft_weight * mean(S_w/n_w)``.

    ``gamma`` is the absolute margin (default 0.5, API.md). SimPOConfig parameterizes it as
    ``gamma_beta_ratio`` (default 0.25) with gamma = ratio * beta, so the two defaults agree only at
    beta = 2; at another beta pass ``gamma_beta_ratio=0.25`` (gamma = 0.25 * beta, as the head
    :func:`fastpref.losses.simpo`; not together with a non-default ``gamma``).

    Difference from Liger-Kernel's ``LigerFusedLinearSimPOLoss``: Liger adds, by default
    (``compute_nll_loss=True``, ``alpha=1``), the chosen responses' token-mean NLL and its default beta
    is 0.1 (ours 2.0, the SimPO config); with ``compute_nll_loss=False`` and the same beta/gamma the two agree.
    """

    reference_mode = "none"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, sft_weight: float = 0.0,
                 gamma_beta_ratio: Optional[float] = None, **options) -> None:
        super().__init__(**options)
        self.beta, self.gamma, self.sft_weight = beta, gamma, sft_weight
        self.gamma_beta_ratio = gamma_beta_ratio

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        return losses.simpo(c, r, lc, lr, beta=self.beta, gamma=self.gamma, sft_weight=self.sft_weight,
                            gamma_beta_ratio=self.gamma_beta_ratio)


class FusedSLiCLoss(_PairwiseLoss):
    r"""SLiC-HF (Zhao et al. 2023, arXiv:2305.10425), fused; reference-free.

    ``loss = mean[max(0, delta - (S_w - S_l)) - reg_weight * S_sft]`` with S_sft the SFT target's log-prob,
    the chosen response unless ``sft_logps`` [S/2] (differentiable) is passed to the call.
    """

    reference_mode = "none"

    def __init__(self, delta: float = 1.0, reg_weight: float = 0.1, **options) -> None:
        super().__init__(**options)
        self.delta, self.reg_weight = delta, reg_weight

    def compute_loss(self, batch: SequenceBatch, sft_logps: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        c, r, _, _, _, _ = self.pairs(batch)
        return losses.slic(c, r, delta=self.delta, reg_weight=self.reg_weight, sft_logps=sft_logps)


class FusedDPOPLoss(_PairwiseLoss):
    r"""DPO-Positive / Smaug (Pal et al. 2024, arXiv:2402.13228), fused.

    ``u = beta (h - lambda * relu(R_w - S_w))``, ``loss = mean[-log sigma(u)]`` (the paper's in-sigmoid
    penalty). Needs the reference.
    """

    def __init__(self, beta: float = 0.3, dpop_lambda: float = 50.0, **options) -> None:
        super().__init__(**options)
        self.beta, self.dpop_lambda = beta, dpop_lambda

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, _, _ = self.pairs(batch)
        return losses.dpop(c, r, rc, rr, beta=self.beta, dpop_lambda=self.dpop_lambda)


class FusedORPOLoss(_PairwiseLoss):
    r"""ORPO (Hong et al. 2024, arXiv:2403.07691), fused; reference-free.

    With a = S/n and log-odds lo = a - log(1 - e^a), d = lo_w - lo_l:
    ``loss = NLL - orpo_lambda * mean[log sigma(d)]``, NLL = -sum(S_w) / sum(n_w) (token mean over chosen).

    Equal to Liger-Kernel's ``LigerFusedLinearORPOLoss`` with its ``beta`` = our ``orpo_lambda``
    (defaults agree at 0.1; Liger also includes the NLL by default). Near p -> 1 we use a stable
    log1mexp with a clamp where Liger uses plain ``log1p(-exp(a))``.
    """

    reference_mode = "none"

    def __init__(self, orpo_lambda: float = 0.1, **options) -> None:
        super().__init__(**options)
        self.orpo_lambda = orpo_lambda

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, lr = self.pairs(batch)
        return losses.orpo(c, r, lc, lr, orpo_lambda=self.orpo_lambda)


class FusedCPOLoss(_PairwiseLoss):
    r"""CPO (Xu et al. 2024, arXiv:2401.08417), fused; reference-free.

    ``loss = mean[-log sigma(beta (S_w - S_l))] + nll_weight * NLL``, NLL = -sum(S_w) / sum(n_w).

    Equal to Liger-Kernel's ``LigerFusedLinearCPOLoss`` defaults (summed log-probs, beta 0.1,
    ``alpha`` = our ``nll_weight`` = 1, ``label_smoothing=0``).
    """

    reference_mode = "none"

    def __init__(self, beta: float = 0.1, nll_weight: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.beta, self.nll_weight = beta, nll_weight

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, _, _, lc, _ = self.pairs(batch)
        return losses.cpo(c, r, lc, beta=self.beta, nll_weight=self.nll_weight)


# ---------------------------------------------------------------------------------------------------
# KTO


class FusedKTOLoss(FusedLossBase):
    r"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306), fused; unpaired.

    With rho = S - R and the reference point z0 = max(0, mean(S' - R')) over mismatched pairs (detached):
    desirable ``lambda_D * sigma(-beta (rho - z0))``, undesirable ``lambda_U * sigma(-beta (z0 - rho))``,
    averaged over all S sequences.

    Call keywords: ``labels`` [S] bool (True = desirable), required; and either ``z0`` (a float or a
    scalar tensor) or the mismatched pairs ``kl_hidden``, ``kl_targets`` (+ ``kl_seq_ids``/``kl_num_seqs``
    when packed) with ``kl_ref_hidden`` or precomputed ``kl_ref_logps``: a no-grad fused pass gives
    S', R', and z0 is their mean over the global batch when torch.distributed is initialized
    (``stats_group``, see :class:`FusedLossBase`). A ``z0`` passed
    directly is used as given: it must be finite, but it is not clamped at 0 (a negative value is
    accepted), like Liger's ``kl`` input; only the mismatched-pair estimate is clamped.

    Equal to Liger-Kernel's ``LigerFusedLinearKTOLoss`` (``use_ref_model=True``, summed log-probs) when
    its ``kl`` argument is our z0; Liger takes the KL reference point as an input and does not clamp it
    at 0, and takes ``(_input, lin_weight)`` in that order.
    """

    extra_pass_reads_ref_head = True  # the mismatched pairs' kl_ref_hidden

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 **options) -> None:
        super().__init__(**options)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def reference_point(self, batch: SequenceBatch, *, z0=None, kl_hidden: Optional[Tensor] = None,
                        kl_targets: Optional[Tensor] = None, kl_ref_hidden: Optional[Tensor] = None,
                        kl_ref_logps: Optional[Tensor] = None, kl_seq_ids: Optional[Tensor] = None,
                        kl_num_seqs: Optional[int] = None) -> Tensor:
        """z0 as a detached scalar in the statistics' dtype (see the class docstring)."""
        like = batch.logps
        if z0 is not None:
            if kl_hidden is not None:
                raise ValueError("FusedKTOLoss: pass either z0 or the mismatched pairs (kl_hidden, ...), not both")
            # A Python float goes straight to the statistics' dtype (no float32 round trip).
            z0 = torch.as_tensor(z0, dtype=like.dtype if not isinstance(z0, torch.Tensor) else None)
            z0 = z0.detach().to(dtype=like.dtype, device=like.device)
            if z0.numel() != 1 or not bool(torch.isfinite(z0).all()):
                raise ValueError(f"z0 must be a finite scalar, got {z0}")
            return z0.reshape(())
        if kl_hidden is None or kl_targets is None:
            raise ValueError("FusedKTOLoss needs the reference point: pass z0, or kl_hidden and kl_targets of "
                             "mismatched pairs with kl_ref_hidden or kl_ref_logps")
        if (kl_ref_hidden is None) == (kl_ref_logps is None):
            raise ValueError("FusedKTOLoss: the mismatched pairs need exactly one of kl_ref_hidden or kl_ref_logps")
        with torch.no_grad():
            stats = self.extra_logprobs(batch, kl_hidden.detach(), kl_targets, seq_ids=kl_seq_ids,
                                        num_seqs=kl_num_seqs, ref_hidden=kl_ref_hidden)
        ref = stats.ref_logps if kl_ref_hidden is not None else _as_stat(
            "kl_ref_logps", kl_ref_logps, stats.logps, [stats.logps.shape])
        # Mean over the global batch: gather S' - R' (the head takes the pair as two vectors).
        diffs = self.gather_statistic(stats.logps - ref)
        return losses.kto_z0(diffs, torch.zeros_like(diffs))

    def compute_loss(self, batch: SequenceBatch, labels: Optional[Tensor] = None, **reference_point) -> Tuple[Tensor, Metrics]:
        if labels is None:
            raise ValueError("FusedKTOLoss needs labels: a [S] bool tensor, True = desirable")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.bool:
            raise TypeError(f"labels must be a bool tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != (batch.num_seqs,):
            raise ValueError(f"labels must have shape ({batch.num_seqs},), got {tuple(labels.shape)}")
        z0 = self.reference_point(batch, **reference_point)
        loss, metrics = losses.kto(batch.logps, batch.ref_logps, labels.to(batch.logps.device), z0=z0,
                                   beta=self.beta, desirable_weight=self.desirable_weight,
                                   undesirable_weight=self.undesirable_weight)
        metrics.setdefault("z0", z0.detach())
        return loss, metrics


# ---------------------------------------------------------------------------------------------------
# VAR


class FusedVARLoss(FusedLossBase):
    r"""VAR, variational alignment with re-weighting, fused: Du, Li, Cheng et al., "RLHF in an SFT Way: From
    Optimal Solution to Reward-Weighted Alignment" (Eqs. 9-10, Alg. 1).

    B prompts with one response each (S = B). With rewards r_ij = r(x_i, y_j) and cross-pair reference
    log-probs L_ij = log pi_ref(y_j | x_i):
    ``log Z_i = LSE_j(r_ij / beta + L_ij) - log B``, ``w_i = sg(exp(r_ii / beta - log Z_i))``,
    ``loss = -(1/B) sum_i w_i S_i`` (``normalize="self"``, the default, rescales w to sum to B).

    Call keywords: ``rewards`` [B] (diagonal r_ii) or [B, B]. The reference: ``ref_logps`` [B] (diagonal)
    or [B, B] (cross pairs, e.g. from :func:`var_cross_pair_ref_logps`), or ``ref_hidden`` for the
    diagonal (same fused pass), or nothing (then, with self-normalization, w = B softmax(r / beta)).
    ``beta`` has no default (the paper reports none).

    Options (see :func:`fastpref.losses.var`; the response lengths n_j come from the fused op):
    ``policy_reduction`` "sum" (default, the paper) or "mean" (S_i / n_i, token-mean SFT style);
    ``ref_reduction`` "sum" (default, the paper's Eq. 9) or "mean" (L_ij / n_j inside Z, a documented
    deviation from the paper that tames the weights' preference for short responses).
    """

    reference_mode = "optional"

    def __init__(self, beta: float, normalize: str = "self", policy_reduction: str = "sum",
                 ref_reduction: str = "sum", **options) -> None:
        super().__init__(**options)
        self.beta = check_positive("beta", beta)
        for name, value in (("normalize", normalize), ("policy_reduction", policy_reduction),
                            ("ref_reduction", ref_reduction)):
            allowed = ("self", "none") if name == "normalize" else ("sum", "mean")
            if value not in allowed:  # fail at construction, not at the first batch
                raise ValueError(f"FusedVARLoss: {name} must be one of {allowed}, got {value!r}")
        self.normalize, self.policy_reduction, self.ref_reduction = normalize, policy_reduction, ref_reduction

    def ref_logps_shapes(self, num_seqs: int) -> List[Tuple[int, ...]]:
        return [(num_seqs,), (num_seqs, num_seqs)]

    def compute_loss(self, batch: SequenceBatch, rewards: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        b = batch.num_seqs
        if rewards is None:
            raise ValueError("FusedVARLoss needs rewards: [B] (r(x_i, y_i)) or [B, B] (r(x_i, y_j))")
        rewards = _as_stat("rewards", rewards, batch.logps, [(b,), (b, b)])
        return losses.var(batch.logps, rewards, beta=self.beta, ref_logps=batch.ref_logps,
                          normalize=self.normalize, lengths=batch.lengths, policy_reduction=self.policy_reduction,
                          ref_reduction=self.ref_reduction)


def _backbone_hidden(output) -> Tensor:
    """Hidden states from a backbone's output: a tensor, a tuple (first item) or ``.last_hidden_state``."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError("ref_backbone must return hidden states [n, L, D] (a tensor, a tuple starting with one, or an "
                    f"object with last_hidden_state), got {type(output).__name__}")


def var_cross_pair_ref_logps(
    prompts: Sequence[Tensor],
    responses: Sequence[Tensor],
    ref_backbone: Callable[[Tensor, Tensor], object],
    ref_weight: Tensor,
    *,
    ref_bias: Optional[Tensor] = None,
    pad_token_id: int = 0,
    prompts_per_chunk: int = 1,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    logprobs_fn: Optional[Callable[..., LogprobStats]] = None,
) -> Tensor:
    """VAR's B x B cross-pair reference log-probs: ``out[i, j] = log pi_ref(y_j | x_i)``, no grad.

    Builds every sequence ``prompts[i] + responses[j]`` (right-padded with ``pad_token_id``), runs the
    reference backbone on them, ``prompts_per_chunk`` prompts (B sequences each) per call, and sums the
    log-probs of the response tokens with the fused op (position t predicts token t + 1; prompt and
    padding positions are ignored).

    Args:
        prompts: B 1-D int64 tensors of prompt token ids.
        responses: B 1-D int64 tensors of response token ids (response j answers prompt j).
        ref_backbone: ``ref_backbone(input_ids [n, L], attention_mask [n, L])`` -> hidden states
            ``[n, L, D]`` before the LM head (a tensor, a tuple whose first item is one, or an object with
            ``last_hidden_state``, e.g. a Hugging Face base model).
        ref_weight: ``[V, D]`` reference LM-head weight; ``ref_bias`` its optional bias.
        logprobs_fn: the log-prob op (default :func:`fastpref.fused_logprobs`; the eager twin in
            ``fastpref.reference`` passes the eager one).

    Returns:
        ``[B, B]`` float32 (float64 for float64 heads) tensor, to pass as ``ref_logps`` to
        :class:`FusedVARLoss`.
    """
    fn = logprobs_fn or _fused_logprobs
    b = len(prompts)
    if b == 0 or len(responses) != b:
        raise ValueError(f"prompts and responses must be non-empty lists of equal length, got {len(prompts)} and "
                         f"{len(responses)}")
    for name, seqs in (("prompts", prompts), ("responses", responses)):
        for t in seqs:
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
                raise TypeError(f"{name} must hold 1-D integer tensors of token ids")
    if any(r.numel() == 0 for r in responses):
        raise ValueError("responses must be non-empty")
    prompts_per_chunk = _check_group_size("prompts_per_chunk", prompts_per_chunk, 1)
    device = ref_weight.device
    out = torch.empty(b, b, dtype=torch.float64 if ref_weight.dtype == torch.float64 else torch.float32,
                      device=device)
    ignore = -100
    with torch.no_grad():
        for i0 in range(0, b, prompts_per_chunk):
            pairs = [(i, j) for i in range(i0, min(i0 + prompts_per_chunk, b)) for j in range(b)]
            lengths = [prompts[i].numel() + responses[j].numel() for i, j in pairs]
            width = max(lengths)
            ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros(len(pairs), width, dtype=torch.long, device=device)
            targets = torch.full((len(pairs), width), ignore, dtype=torch.long, device=device)
            for row, (i, j) in enumerate(pairs):
                p, r = prompts[i].to(device), responses[j].to(device)
                ids[row, : p.numel()] = p
                ids[row, p.numel(): lengths[row]] = r
                mask[row, : lengths[row]] = 1
                # Position t predicts token t + 1: the response tokens sit at p-1 .. len-2.
                targets[row, p.numel() - 1: lengths[row] - 1] = r
            if any(prompts[i].numel() == 0 for i, _ in pairs):
                raise ValueError("prompts must be non-empty (the first response token needs a context)")
            hidden = _backbone_hidden(ref_backbone(ids, mask))
            hidden = hidden.to(ref_weight.dtype)
            stats = fn(hidden, ref_weight, targets, bias=ref_bias, temperature=temperature, softcap=softcap,
                       ignore_index=ignore, backend=backend)
            rows = sorted({i for i, _ in pairs})
            out[rows[0]: rows[-1] + 1] = stats.logps.view(len(rows), b).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# alpha-DPO


class FusedAlphaDPOLoss(_PairwiseLoss):
    r"""alpha-DPO, fused: Wu et al. 2024, "alpha-DPO: Adaptive Reward Margin is What Direct Preference
    Optimization Needs" (arXiv:2410.10148, Eqs. 9-12; public code junkangwu/alpha-DPO).

    Length-averaged statistics S/n, R/n. The margin signal M = (S̄_w - S̄_l) - (R̄_w - R̄_l) is z-scored with
    running statistics: ``M* = (M - mu) / sigma``, ``m = sg(beta (gamma_beta_ratio + alpha M*))``,
    ``loss = mean[-(1-eps) log sigma(u - m) - eps log sigma(m - u)]`` with u = beta (S̄_w - S̄_l).

    Running statistics (buffers): ``margin_mean`` and ``margin_std`` hold the raw exponential moving
    averages (momentum 0.9, initialized at 0) of the batch mean and unbiased std of M, ``num_updates``
    the number of updates k. In training mode they are updated *before* use from the batch's M,
    gathered over the global batch when torch.distributed is initialized (``stats_group``, see
    :class:`FusedLossBase`: each vocabulary-parallel replica counted once; global batch >= 2 pairs). The
    statistics used are the bias-corrected ``ema / (1 - momentum^k)`` (default) or, with
    ``bias_correction=False``, the raw EMA. In ``eval()`` they are frozen (not updated); before any
    update, eval uses the batch's own statistics.

    Relation to the public code (``junkangwu/alpha-DPO``, ``update_and_sync_ref_mean_std``): with
    ``bias_correction=False`` the *training-mode* update is the same (EMA from 0 with momentum 0.9 of
    the gathered batch's mean and unbiased std, updated before use), but the module is not identical
    to it: (1) the public code also updates the EMA on evaluation batches, the module freezes it in
    ``eval()``; (2) an ``eval()`` call before any training update uses the batch statistics, where
    the public code would update from the zero initialization; (3) the std is floored at 1e-6
    (:func:`fastpref.losses.alpha_dpo`), where the public code divides by the raw EMA (infinite or
    NaN margin at std 0); (4) the buffers are float64 (the public code's are float32).
    Default: API.md (binding) makes bias correction the default; LOSSES.md §2 suggests it only as an
    opt-in. The default follows API.md; pass ``bias_correction=False`` for the public code's scale
    (whose first step z-scores with 0.1·std, inflating M* tenfold). Needs the reference.
    """

    def __init__(self, beta: float = 10.0, gamma_beta_ratio: float = 0.4, alpha: float = 0.05,
                 label_smoothing: float = 0.0, momentum: float = 0.9, bias_correction: bool = True,
                 **options) -> None:
        super().__init__(**options)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.beta, self.gamma_beta_ratio, self.alpha = beta, gamma_beta_ratio, alpha
        self.label_smoothing, self.momentum, self.bias_correction = label_smoothing, momentum, bias_correction
        # float64 buffers: the statistics are a handful of scalars; keep them exact.
        self.register_buffer("margin_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("margin_std", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _batch_statistics(self, margin: Tensor) -> Tuple[Tensor, Tensor]:
        # over the ranks stats_group selects, each distinct batch once (see FusedLossBase)
        gathered = self.gather_statistic(margin).double()
        if gathered.numel() < 2:
            raise ValueError("FusedAlphaDPOLoss needs a global batch of at least 2 pairs to estimate the margin "
                             f"std, got {gathered.numel()} (stats_group={self.stats_group!r})")
        return gathered.mean(), gathered.std(unbiased=True)

    @torch.no_grad()
    def update_statistics(self, margin: Tensor) -> None:
        """One EMA step from the batch margins M (gathered over ranks)."""
        mean, std = self._batch_statistics(margin)
        m = self.momentum
        self.margin_mean.mul_(m).add_((1 - m) * mean.to(self.margin_mean))
        self.margin_std.mul_(m).add_((1 - m) * std.to(self.margin_std))
        self.num_updates += 1

    def margin_statistics(self) -> Tuple[Tensor, Tensor]:
        """The (mean, std) used for z-scoring now: bias-corrected EMA unless ``bias_correction=False``."""
        if not self.bias_correction:
            return self.margin_mean, self.margin_std
        # On device (no host sync per step): 1 - momentum^k.
        correction = 1.0 - self.momentum ** self.num_updates.to(self.margin_mean.dtype)
        return self.margin_mean / correction, self.margin_std / correction

    def compute_loss(self, batch: SequenceBatch) -> Tuple[Tensor, Metrics]:
        c, r, rc, rr, lc, lr = self.pairs(batch)
        margin = losses.alpha_dpo_margin(c, r, rc, rr, lc, lr)
        if self.training:
            self.update_statistics(margin)
            mean, std = self.margin_statistics()
        elif int(self.num_updates.item()) == 0:
            mean, std = self._batch_statistics(margin)
        else:
            mean, std = self.margin_statistics()
        like = batch.logps
        mean, std = mean.to(like.dtype), std.to(like.dtype)
        loss, metrics = losses.alpha_dpo(c, r, rc, rr, lc, lr, beta=self.beta,
                                         gamma_beta_ratio=self.gamma_beta_ratio, alpha=self.alpha,
                                         margin_mean=mean, margin_std=std, label_smoothing=self.label_smoothing)
        metrics.setdefault("margin", margin.detach())
        metrics["margin_mean"], metrics["margin_std"] = mean.detach().clone(), std.detach().clone()
        return loss, metrics


# ---------------------------------------------------------------------------------------------------
# MC-PO


class FusedMCPOLoss(FusedLossBase):
    r"""MC-PO, preference optimization with an MC-kernel hard negative, fused: Chen et al., "Preference
    Optimization via Contrastive Divergence: Your Reward Model is Secretly an NLL Estimator" (Eq. 7, Alg. 1).

    Grouped layout S = B * G, G = K + 1, column 0 the preferred response. With r_i = S_i - R_i:
    negatives Z are drawn from softmax_i(beta r_i) (no grad; ``include_positive=False`` excludes y_0),
    ``loss = mean_b[-beta r_0 + LSE_{i in {0} u Z}(beta r_i)]``.

    One fused forward over all K + 1 sequences (policy and reference) gives the statistics; the MC
    kernel samples from their detached values (:func:`fastpref.losses.mcpo_sample_negatives`), and the
    loss reads only the preferred and sampled columns. Unselected sequences therefore get an upstream
    gradient of exactly zero, and the fused backward skips zero-gradient positions: they cost no
    backward work. (This does the paper's no-grad pass and the gradient pass in one forward; a separate
    no-grad pass would recompute the selected sequences' forward.)

    Options: ``group_size`` (G = K + 1; also a call keyword), ``num_negatives`` (M), ``include_positive``,
    ``generator`` (a ``torch.Generator`` on the statistics' device, seeding the sampling; also a call
    keyword). Needs the reference (``ref_hidden`` or ``ref_logps`` [S]). Metrics include ``negatives``.

    Precomputed negatives: the call keyword ``negatives`` ([B, M] int64 column indices in 0..G-1 of this
    call's groups) skips the sampling. With it a caller can run the no-grad pass itself on all K + 1
    sequences (:meth:`sample_negatives` on their statistics), then call the module with grad on the
    preferred and the selected sequences only, e.g. G = 1 + M rows per prompt (the preferred one, then
    the M selected ones in order), ``ref_logps`` of those rows and ``negatives = [1..M]`` for every prompt:
    the loss and the gradients equal the full call's with the same negatives, and the unselected
    sequences get no forward with grad at all (``FastPrefDPOTrainer`` does this).

    With ``vocab_parallel_group``, the negatives (sampled or given) are broadcast from the group's rank 0,
    so every rank of the group uses the same ones (with ``generator=None`` the ranks' draws would
    otherwise differ, silently mixing the gradients of different negatives).
    """

    def __init__(self, beta: float = 0.01, group_size: Optional[int] = None, num_negatives: int = 1,
                 include_positive: bool = False, generator: Optional[torch.Generator] = None, **options) -> None:
        super().__init__(**options)
        self.beta, self.num_negatives, self.include_positive = beta, num_negatives, include_positive
        self.group_size = None if group_size is None else _check_group_size("group_size", group_size, 2)
        self.generator = generator

    def sample_negatives(self, logps: Tensor, ref_logps: Tensor,
                         generator: Optional[torch.Generator] = None) -> Tensor:
        """MC-kernel negatives [B, M] from grouped statistics ``logps``/``ref_logps`` [B, G] (detached), with
        this module's ``beta``, ``num_negatives`` and ``include_positive``; ``generator`` defaults to the
        module's. Broadcast from rank 0 of ``vocab_parallel_group`` when one is set (every rank must call)."""
        negatives = losses.mcpo_sample_negatives(
            logps.detach(), ref_logps.detach(), beta=self.beta, num_negatives=self.num_negatives,
            generator=generator if generator is not None else self.generator, include_positive=self.include_positive)
        return self._same_on_vocab_ranks(negatives)

    def _same_on_vocab_ranks(self, negatives: Tensor) -> Tensor:
        """``negatives`` of rank 0 of the vocabulary-parallel group, on every rank of it."""
        group = self.vocab_parallel_group
        if group is None or not _is_distributed() or torch.distributed.get_world_size(group) == 1:
            return negatives
        negatives = negatives.contiguous()
        torch.distributed.broadcast(negatives, src=torch.distributed.get_global_rank(group, 0), group=group)
        return negatives

    def compute_loss(self, batch: SequenceBatch, group_size: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     negatives: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        g = group_size if group_size is not None else self.group_size
        if g is None:
            raise ValueError("FusedMCPOLoss needs group_size (K + 1 sequences per prompt), in the constructor or "
                             "the call")
        g = _check_group_size("group_size", g, 2)
        b = _check_grouped(batch.num_seqs, g)
        logps, ref_logps = batch.logps.view(b, g), batch.ref_logps.view(b, g)
        if negatives is None:
            negatives = self.sample_negatives(logps, ref_logps, generator)
        else:
            if generator is not None:
                raise ValueError("FusedMCPOLoss: pass either negatives (precomputed) or generator (to sample), "
                                 "not both")
            if not isinstance(negatives, torch.Tensor) or negatives.dtype != torch.int64:
                raise TypeError("negatives must be an int64 tensor [B, M] of column indices, got "
                                f"{getattr(negatives, 'dtype', type(negatives).__name__)}")
            if negatives.dim() != 2 or negatives.shape[0] != b or negatives.shape[1] < 1:
                raise ValueError(f"negatives must have shape ({b}, M) with M >= 1 (B = {b} groups of {g}), got "
                                 f"{tuple(negatives.shape)}")
            if bool(((negatives < 0) | (negatives >= g)).any()):
                raise ValueError(f"negatives must be column indices in 0..{g - 1} of the groups of {g}")
            negatives = self._same_on_vocab_ranks(negatives.to(logps.device))
        return losses.mcpo(logps, ref_logps, beta=self.beta, negatives=negatives)


# ---------------------------------------------------------------------------------------------------
# SPO


class FusedSPOLoss(FusedLossBase):
    r"""SPO, fused: "Soft Preference Optimization: Aligning Language Models to Expert Distributions"
    (Eqs. 5, 8-15, Alg. 1): a reference-free preference term plus a full-vocabulary KL regularizer on
    online samples.

    ``loss = mean_pairs[(mu / alpha) softplus(alpha (S_l - S_w))] + kl_coef * mean_s K_s`` with
    ``mu = sg(2 sigma(exp(gamma logaddexp(S_w, S_l)) - E_batch[...]))`` (gamma = 0: mu = 1) and
    ``K_s = sum_t KL(pi_theta(.|ctx_t) || pi_ref(.|ctx_t))`` over the online sample's positions.
    ``mode="best_of_n"`` (Eq. 14, call keyword ``best`` [B]) and ``mode="ranked"`` (Eq. 15, columns in rank
    order) use the grouped layout with ``group_size`` = n.

    Call keywords: ``kl_hidden``, ``kl_ref_hidden``, ``kl_targets`` (+ ``kl_seq_ids``/``kl_num_seqs`` when
    packed): the online samples y' ~ pi_theta(.|x') in the same layouts as ``hidden``; a second fused
    pass computes their token KL(pi_theta || pi_ref) with gradient through ``kl_hidden``, ``weight`` and
    ``bias``. The reference head is ``ref_weight``/``ref_bias`` (default: the policy head, detached).
    Without ``kl_hidden`` the loss is the preference term only. ``weight_baseline`` (call keyword)
    overrides the batch estimate E_batch; when torch.distributed is initialized and it is not given, E is
    the mean over the global batch (``stats_group``, see :class:`FusedLossBase`; LOSSES.md §5 recommends
    the global batch).
    """

    reference_mode = "none"
    extra_pass_reads_ref_head = True  # the online samples' kl_ref_hidden
    modes = ("pairs", "best_of_n", "ranked")

    def __init__(self, alpha: float = 0.01, gamma: float = 0.0, kl_coef: float = 0.01, mode: str = "pairs",
                 group_size: Optional[int] = None, **options) -> None:
        super().__init__(**options)
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        if mode != "pairs" and group_size is None:
            raise ValueError(f"mode={mode!r} needs group_size (n responses per prompt)")
        self.alpha, self.gamma, self.kl_coef, self.mode = alpha, gamma, kl_coef, mode
        self.group_size = None if group_size is None else _check_group_size("group_size", group_size, 2)

    def online_kl(self, batch: SequenceBatch, kl_hidden: Optional[Tensor], kl_ref_hidden: Optional[Tensor],
                  kl_targets: Optional[Tensor], kl_seq_ids: Optional[Tensor], kl_num_seqs: Optional[int]) -> Optional[Tensor]:
        """Per-sample summed token KL(pi_theta || pi_ref) of the online samples, or None without them."""
        given = [x is not None for x in (kl_hidden, kl_ref_hidden, kl_targets)]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("FusedSPOLoss: the online samples need all of kl_hidden, kl_ref_hidden and kl_targets")
        stats = self.extra_logprobs(batch, kl_hidden, kl_targets, seq_ids=kl_seq_ids, num_seqs=kl_num_seqs,
                                    ref_hidden=kl_ref_hidden, kl="forward")
        return stats.kl

    def compute_loss(self, batch: SequenceBatch, kl_hidden: Optional[Tensor] = None,
                     kl_ref_hidden: Optional[Tensor] = None, kl_targets: Optional[Tensor] = None,
                     kl_seq_ids: Optional[Tensor] = None, kl_num_seqs: Optional[int] = None,
                     best: Optional[Tensor] = None, weight_baseline: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        kl = self.online_kl(batch, kl_hidden, kl_ref_hidden, kl_targets, kl_seq_ids, kl_num_seqs)
        if self.mode == "pairs":
            if best is not None:
                raise ValueError("best is for mode='best_of_n'")
            _check_pairwise(batch.num_seqs)
            logps = torch.stack(_split_pairs(batch.logps), dim=1)
        else:
            logps = batch.logps.view(_check_grouped(batch.num_seqs, self.group_size), self.group_size)
        if weight_baseline is None and _is_distributed() and self.stats_group != "local":
            # Eq. 12's E over the global batch (LOSSES.md §5): all-reduce this rank's estimate.
            local = losses.spo_weight_baseline(logps, gamma=self.gamma, ranked=self.mode == "ranked")
            weight_baseline = self.mean_statistic(local, logps.shape[0])
        common = dict(alpha=self.alpha, gamma=self.gamma, kl=kl, kl_coef=self.kl_coef,
                      weight_baseline=weight_baseline)
        if self.mode == "pairs":
            return losses.spo(logps[:, 0], logps[:, 1], **common)
        b = logps.shape[0]
        if self.mode == "ranked":
            if best is not None:
                raise ValueError("best is for mode='best_of_n'; mode='ranked' takes columns in rank order")
            return losses.spo_ranked(logps, **common)
        if best is None:
            raise ValueError("mode='best_of_n' needs best: [B] int64 index of the best response in each group")
        if not isinstance(best, torch.Tensor) or best.dtype.is_floating_point or tuple(best.shape) != (b,):
            raise ValueError(f"best must be an integer tensor of shape ({b},)")
        return losses.spo_best_of_n(logps, best.to(device=logps.device, dtype=torch.int64), **common)


def _register_self_checks() -> None:
    """Add the module rows to ``fastpref check`` (fastpref/commands/check.py's EXTRA_CHECKS)."""
    from .commands.check import EXTRA_CHECKS
    from ._module_checks import check_modules

    EXTRA_CHECKS["modules"] = check_modules


_register_self_checks()
