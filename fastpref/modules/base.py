"""What every fused loss module shares: the output type, the LM head, one call's per-sequence
statistics, the sequence-layout checks and the base class (docs/api.md §3).

Every module has the same call shape, LM-head weight first::

    out = loss_fn(weight, hidden, targets, *, bias=None,
                  temperature=1.0, softcap=None,                       # the head's logit map
                  ref_hidden=None, ref_weight=None, ref_bias=None,     # reference from hidden states ...
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

Loss hyper-parameters are constructor arguments, and so are ``ignore_index``, ``backend`` and
``vocab_parallel_group`` (a vocabulary-sharded LM head, see :func:`fastpref.fused_logprobs`), which
every fused pass of the module shares. ``temperature`` and ``softcap`` describe the model's LM head,
not the loss: they are call keywords, like ``weight`` and ``bias``, and travel in one :class:`LMHead`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._prepare import check_extra_outputs
from .._types import IGNORE_INDEX, KernelOptions, LogprobStats
from ..ops import fused_logprobs as _fused_logprobs
from .batch_stats import check_stats_group, gather_across_ranks, global_mean

Tensor = torch.Tensor
Metrics = Dict[str, Tensor]

#: Options of the LM head that the constructors refuse (they are call keywords).
HEAD_OPTIONS = ("temperature", "softcap")


@dataclass
class LossOutput:
    """What every fused module returns: ``loss`` (scalar) and ``metrics`` (detached tensors).

    Unpacks like a tuple: ``loss, metrics = loss_fn(...)``.
    """

    loss: Tensor
    metrics: Metrics = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        return iter((self.loss, self.metrics))


@dataclass(frozen=True)
class LMHead:
    """An LM head as the fused op reads it: ``weight`` ``[V, D]``, optional ``bias`` ``[V]``, and the
    model's logit map (logits / ``temperature``, then ``softcap * tanh(logits / softcap)``)."""

    weight: Tensor
    bias: Optional[Tensor] = None
    temperature: float = 1.0
    softcap: Optional[float] = None

    def reference(self, ref_weight: Optional[Tensor], ref_bias: Optional[Tensor]) -> "LMHead":
        """The reference head: ``ref_weight``/``ref_bias`` when given, else this head detached (its bias
        too unless ``ref_bias`` is given), as :func:`fastpref.fused_logprobs` defaults. The logit map
        is this head's: the op applies one temperature and softcap to both heads."""
        if ref_weight is None:
            ref_weight = self.weight.detach()
            if ref_bias is None and self.bias is not None:
                ref_bias = self.bias.detach()
        return LMHead(ref_weight, ref_bias, self.temperature, self.softcap)


@dataclass
class SequenceBatch:
    """One call's per-sequence statistics, plus the heads that extra fused passes reuse."""

    stats: LogprobStats  # policy statistics of the S sequences (logps carries the graph)
    ref_logps: Optional[Tensor]  # [S] (VAR: [S] or [S, S]) reference log-probs, no grad; None if unused
    head: LMHead  # the policy head of this call
    ref_head: LMHead  # the reference head of this call (the policy head, detached, unless one was given)

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
# inputs and layouts


def as_stat(name: str, value: Tensor, like: Tensor, shapes: Sequence[Tuple[int, ...]]) -> Tensor:
    """Validate a user-supplied per-sequence statistic; return it detached in ``like``'s dtype/device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if tuple(value.shape) not in [tuple(s) for s in shapes]:
        allowed = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"{name} must have shape {allowed}, got {tuple(value.shape)}")
    return value.detach().to(dtype=like.dtype, device=like.device)


def split_pairs(values: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise layout: the first half is chosen, the second half rejected."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def check_pairwise(num_seqs: int) -> None:
    if num_seqs == 0 or num_seqs % 2:
        raise ValueError(
            f"pairwise losses need an even, non-zero number of sequences (first half chosen, second half "
            f"rejected), got num_seqs={num_seqs}"
        )


def check_grouped(num_seqs: int, group_size: int) -> int:
    """The number of groups B of a grouped layout ``num_seqs = B * group_size``."""
    if num_seqs == 0 or num_seqs % group_size:
        raise ValueError(
            f"grouped layout needs num_seqs = B * group_size (sequence b * G + g); got num_seqs={num_seqs}, "
            f"group_size={group_size}"
        )
    return num_seqs // group_size


def with_extra_outputs(options: dict, names: Sequence[str]) -> dict:
    """``options`` (constructor keywords) whose ``extra_outputs`` also hold ``names`` (order kept, no repeats):
    how a module or a trainer asks for the op's extra outputs it reads on top of the user's."""
    given = tuple(options.get("extra_outputs") or ())
    return {**options, "extra_outputs": given + tuple(n for n in names if n not in given)}


def _reject_options(owner: str, unknown: dict) -> None:
    """TypeError for constructor keywords no module takes; the head's options get a pointer to the call."""
    moved = [k for k in HEAD_OPTIONS if k in unknown]
    if moved:
        one = len(moved) == 1
        raise TypeError(
            f"{owner}: {' and '.join(moved)} {'belongs' if one else 'belong'} to the LM head, not to the loss; "
            f"pass {'it' if one else 'them'} per call: "
            f"loss_fn(weight, hidden, targets, {', '.join(f'{k}=...' for k in moved)})"
        )
    if unknown:
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {next(iter(unknown))!r}")


# ---------------------------------------------------------------------------------------------------
# base class


class FusedLossBase(nn.Module):
    """Shared machinery of the fused loss modules (see the module docstring for the call shape).

    Subclasses set :attr:`reference_mode` and implement :meth:`compute_loss`; the eager twins in
    ``fastpref.reference`` override only :attr:`fused_logprobs`.

    Options every module accepts: ``ignore_index``, ``backend`` (as in :func:`fastpref.fused_logprobs`),
    ``extra_outputs`` (names of ``fastpref._types.EXTRA_OUTPUTS``: the policy pass also computes them, and
    :meth:`finish` adds their detached per-sequence sums to the metrics under the same names; the loss
    never reads them) and, for distributed runs:

    - ``vocab_parallel_group``: a process group over which the LM head is split by vocabulary rows
      (see :func:`fastpref.fused_logprobs`); every rank of it makes the same call on the same batch.
      ``weight``/``bias`` (and the reference head) are this rank's vocabulary slice; MC-PO's negatives
      are broadcast from the group's rank 0.
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
    #: The op's ``kl`` mode computed in the call's pass when ``ref_hidden`` is given, for metrics only (per-sequence
    #: full-vocabulary KL; no gradient flows into it unless a loss uses it). None: no KL.
    sequence_kl: Optional[str] = None

    def __init__(self, *, ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                 vocab_parallel_group: Optional[object] = None, stats_group: Optional[object] = None,
                 extra_outputs: Sequence[str] = (), kernel_options: Optional[KernelOptions] = None,
                 **unknown: object) -> None:
        _reject_options(type(self).__name__, unknown)
        if kernel_options is not None and not isinstance(kernel_options, KernelOptions):
            raise TypeError(f"kernel_options must be a fastpref.KernelOptions, got {type(kernel_options).__name__}")
        super().__init__()
        self.kernel_options = kernel_options
        self.extra_outputs = check_extra_outputs(extra_outputs)
        self.ignore_index = ignore_index
        self.backend = backend
        self.vocab_parallel_group = vocab_parallel_group
        self.stats_group = check_stats_group(stats_group)

    # -- fused passes --------------------------------------------------------------------------------

    def logprob_options(self) -> dict:
        """The module's keyword arguments of every fused_logprobs call (the head's come per call). Not the
        ``extra_outputs``: only the call's main pass (:meth:`run_logprobs`) computes them."""
        options = dict(ignore_index=self.ignore_index, backend=self.backend)
        if self.kernel_options is not None:
            options["options"] = self.kernel_options
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

    def head_logprobs(self, head: LMHead, ref_head: LMHead, hidden: Tensor, targets: Tensor, *,
                      seq_ids: Optional[Tensor], num_seqs: Optional[int], ref_hidden: Optional[Tensor] = None,
                      kl: Optional[str] = None, extra_outputs: Sequence[str] = ()) -> LogprobStats:
        """One fused pass through ``head`` (and ``ref_head`` when ``ref_hidden`` is given)."""
        with_ref = ref_hidden is not None
        return self.fused_logprobs(
            hidden, head.weight, targets, bias=head.bias, seq_ids=seq_ids, num_seqs=num_seqs,
            ref_hidden=ref_hidden, ref_weight=ref_head.weight if with_ref else None,
            ref_bias=ref_head.bias if with_ref else None, kl=kl, temperature=head.temperature,
            softcap=head.softcap, extra_outputs=extra_outputs, **self.logprob_options(),
        )

    def run_logprobs(self, head: LMHead, hidden: Tensor, targets: Tensor, *, ref_hidden: Optional[Tensor],
                     ref_weight: Optional[Tensor], ref_bias: Optional[Tensor], ref_logps: Optional[Tensor],
                     seq_ids: Optional[Tensor], num_seqs: Optional[int]) -> SequenceBatch:
        """The call's fused pass: policy statistics, plus reference log-probs when ``ref_hidden`` is given."""
        self._check_reference_args(ref_hidden, ref_weight, ref_bias, ref_logps)
        if not isinstance(head.weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(head.weight).__name__}")
        ref_head = head.reference(ref_weight, ref_bias)
        stats = self.head_logprobs(head, ref_head, hidden, targets, seq_ids=seq_ids, num_seqs=num_seqs,
                                   ref_hidden=ref_hidden, kl=self.sequence_kl if ref_hidden is not None else None,
                                   extra_outputs=self.extra_outputs)
        if ref_hidden is not None:
            ref = stats.ref_logps
        else:
            ref = self.given_ref_logps(ref_logps, stats.logps)
        return self.sequence_batch(stats, ref, head, ref_head, targets=targets, seq_ids=seq_ids)

    def given_ref_logps(self, ref_logps: Optional[Tensor], logps: Tensor) -> Optional[Tensor]:
        """A user's precomputed ``ref_logps``, validated and detached in ``logps``' dtype (None stays None)."""
        if ref_logps is None:
            return None
        return as_stat("ref_logps", ref_logps, logps, self.ref_logps_shapes(logps.shape[0]))

    def sequence_batch(self, stats: LogprobStats, ref: Optional[Tensor], head: LMHead, ref_head: LMHead, *,
                       targets: Tensor, seq_ids: Optional[Tensor]) -> SequenceBatch:
        """The :class:`SequenceBatch` that :meth:`compute_loss` reads (a subclass adds what its loss needs)."""
        return SequenceBatch(stats=stats, ref_logps=ref, head=head, ref_head=ref_head)

    def separable_call(self, loss_specific: dict) -> bool:
        """Whether this call's loss is a sum of independent per-unit terms (False here: nothing is promised)."""
        return False

    def separable_units(self, num_seqs: int, loss_specific: dict) -> Optional[Tensor]:
        """``[U, k]`` sequence indices of the independent units of this call's loss (the loss is a sum of one
        term per unit, each reading only its unit's statistics), or None when the loss couples the batch. What
        ``KernelOptions.grad_in_forward`` needs; None here: the base class promises nothing."""
        return None

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
        ref_head_given = ref_weight is not None or ref_bias is not None
        if ref_head_given and ref_hidden is None and not self.extra_pass_reads_ref_head:
            raise ValueError(f"{name}: ref_weight/ref_bias are the reference head for ref_hidden, which was not given")

    def extra_logprobs(self, batch: SequenceBatch, hidden: Tensor, targets: Tensor, *, seq_ids: Optional[Tensor],
                       num_seqs: Optional[int], ref_hidden: Optional[Tensor] = None, kl: Optional[str] = None,
                       ) -> LogprobStats:
        """A second fused pass on other sequences (online samples, mismatched pairs) with this call's heads."""
        return self.head_logprobs(batch.head, batch.ref_head, hidden, targets, seq_ids=seq_ids,
                                  num_seqs=num_seqs, ref_hidden=ref_hidden, kl=kl)

    # -- the call ------------------------------------------------------------------------------------

    def forward(self, weight: Tensor, hidden: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                temperature: float = 1.0, softcap: Optional[float] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, **loss_specific) -> LossOutput:
        """Loss of one batch; see the class docstring for the loss-specific keyword arguments.

        ``weight``, ``bias``, ``temperature`` and ``softcap`` are the policy's LM head (logits =
        ``softcap * tanh((hidden @ weight.T + bias) / temperature / softcap)``, as in
        :func:`fastpref.fused_logprobs`); the reference head and every extra pass use the same logit map.
        """
        head = LMHead(weight, bias, temperature, softcap)
        if self.kernel_options is not None and self.kernel_options.grad_in_forward:
            from .grad_in_forward import forward_with_grads

            out = forward_with_grads(self, head, hidden, targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                     ref_bias=ref_bias, ref_logps=ref_logps, seq_ids=seq_ids, num_seqs=num_seqs,
                                     loss_specific=loss_specific)
            if out is not None:
                return out
        batch = self.run_logprobs(head, hidden, targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  ref_bias=ref_bias, ref_logps=ref_logps, seq_ids=seq_ids, num_seqs=num_seqs)
        loss, metrics = self.compute_loss(batch, **loss_specific)
        return self.finish(batch, loss, metrics)

    def finish(self, batch: SequenceBatch, loss: Tensor, metrics: Metrics) -> LossOutput:
        metrics = dict(metrics)
        metrics.setdefault("logps", batch.logps.detach())
        for name in self.extra_outputs:  # per-sequence sums of the requested extras, for logging only
            metrics[name] = getattr(batch.stats, name).detach()
        return LossOutput(loss=loss, metrics=metrics)

    def compute_loss(self, batch: SequenceBatch, **loss_specific) -> Tuple[Tensor, Metrics]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())

    def hyperparameters(self) -> dict:
        """The module's options (loss hyper-parameters and the fused-pass options), for logging."""
        skip = {"training"}
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and k not in skip and not isinstance(v, (torch.Tensor, torch.Generator))}


class _PairwiseLoss(FusedLossBase):
    """Pairwise layout: sequence i (chosen) pairs with sequence i + S/2 (rejected)."""

    #: True when the loss is a mean (or sum) of per-pair terms (see :meth:`separable_units`).
    separable: bool = True

    def separable_call(self, loss_specific: dict) -> bool:
        """Whether this call's loss is a sum of per-pair terms (a subclass refuses options that couple pairs)."""
        return self.separable

    def separable_units(self, num_seqs: int, loss_specific: dict) -> Optional[Tensor]:
        """The pairs ``[S/2, 2]`` (``(i, i + S/2)``) when :meth:`separable_call` holds, else None."""
        if not self.separable_call(loss_specific) or num_seqs == 0 or num_seqs % 2:
            return None
        half = num_seqs // 2
        chosen = torch.arange(half)
        return torch.stack([chosen, chosen + half], dim=1)

    def pairs(self, batch: SequenceBatch) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
        """(chosen, rejected) splits of logps, ref_logps and lengths."""
        check_pairwise(batch.num_seqs)
        chosen, rejected = split_pairs(batch.logps)
        ref_chosen, ref_rejected = split_pairs(batch.ref_logps) if batch.ref_logps is not None else (None, None)
        len_chosen, len_rejected = split_pairs(batch.lengths)
        return chosen, rejected, ref_chosen, ref_rejected, len_chosen, len_rejected
