"""MC-PO, fused (docs/api.md §3, docs/losses.md §3-4): grouped layout, MC-kernel hard negatives."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import losses
from .._checks import check_int
from ..losses.mcpo import SAMPLINGS, mcpo_sampling_weights
from .base import FusedLossBase, Metrics, SequenceBatch, Tensor, check_grouped
from .batch_stats import broadcast_from_first


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
    ``sampling`` (``"mc"``, the MC kernel, default; ``"max"`` / ``"min"``, the paper's Fig. 2 variants taking
    the M candidates of highest / lowest weight, deterministic), ``generator`` (a ``torch.Generator`` on the
    statistics' device, seeding the sampling; also a call keyword). Needs the reference (``ref_hidden`` or
    ``ref_logps`` [S]). Metrics include the paper's quantities: ``negatives`` [B, M] (the sampled column
    indices) and ``sampling_weights`` [B, G] (the kernel's w_i = softmax(β r_i) of this call's groups, over
    the pool: column 0 is 0 with ``include_positive=False``), besides :func:`fastpref.losses.mcpo`'s.

    Gradient scale of ``include_positive``: the default (False) never draws y₀, whose draw in the literal
    Alg. 1 (True) gives a zero gradient for M = 1. Each prompt's expected gradient is thus 1 / (1 − w_0) times
    the literal one, w_0 = softmax(β r)_0 over all G columns: e.g. 1.91x for K = 3, β r = (1, 0, 0, 0)
    (w_0 = e / (e + 3) ≈ 0.475), 2x for K = 1 with equal rewards.

    Precomputed negatives: the call keyword ``negatives`` ([B, M] int64 column indices in 0..G-1 of this
    call's groups, checked by the head :func:`fastpref.losses.mcpo`) skips the sampling. With it a caller
    can run the no-grad pass itself on all K + 1 sequences (:meth:`sample_negatives` on their
    statistics), then call the module with grad on the preferred and the selected sequences only, e.g.
    G = 1 + M rows per prompt (the preferred one, then the M selected ones in order), ``ref_logps`` of
    those rows and ``negatives = [1..M]`` for every prompt: the loss and the gradients equal the full
    call's with the same negatives, and the unselected sequences get no forward with grad at all
    (``FastPrefDPOTrainer`` does this).

    With ``vocab_parallel_group``, the negatives (sampled or given) are broadcast from the group's rank 0,
    so every rank of the group uses the same ones (with ``generator=None`` the ranks' draws would
    otherwise differ, silently mixing the gradients of different negatives).
    """

    def __init__(self, beta: float = 0.01, group_size: Optional[int] = None, num_negatives: int = 1,
                 include_positive: bool = False, generator: Optional[torch.Generator] = None,
                 sampling: str = "mc", **options) -> None:
        super().__init__(**options)
        if sampling not in SAMPLINGS:
            raise ValueError(f"FusedMCPOLoss: sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.beta, self.num_negatives, self.include_positive = beta, num_negatives, include_positive
        self.sampling = sampling
        self.group_size = None if group_size is None else check_int("group_size", group_size, minimum=2)
        self.generator = generator

    def sample_negatives(self, logps: Tensor, ref_logps: Tensor,
                         generator: Optional[torch.Generator] = None) -> Tensor:
        """MC-kernel negatives [B, M] from grouped statistics ``logps``/``ref_logps`` [B, G] (detached), with
        this module's ``beta``, ``num_negatives``, ``include_positive`` and ``sampling``; ``generator`` defaults to the
        module's. Broadcast from rank 0 of ``vocab_parallel_group`` when one is set (every rank must call)."""
        negatives = losses.mcpo_sample_negatives(
            logps.detach(), ref_logps.detach(), beta=self.beta, num_negatives=self.num_negatives,
            generator=generator if generator is not None else self.generator, include_positive=self.include_positive,
            sampling=self.sampling)
        return broadcast_from_first(negatives, self.vocab_parallel_group)

    def sampling_weights(self, logps: Tensor, ref_logps: Tensor) -> Tensor:
        """The kernel's weights [B, G] (detached) of grouped ``logps``/``ref_logps`` [B, G], with this module's
        ``beta`` and ``include_positive`` (:func:`fastpref.losses.mcpo.mcpo_sampling_weights`)."""
        return mcpo_sampling_weights(logps.detach(), ref_logps.detach(), beta=self.beta,
                                     include_positive=self.include_positive)

    def separable_call(self, loss_specific: dict) -> bool:
        """Prompts are independent once ``negatives`` are given; sampling inside the call draws them for the whole
        batch from one generator stream (``KernelOptions.grad_in_forward`` then takes the recompute path)."""
        return loss_specific.get("negatives") is not None and loss_specific.get("generator") is None

    def separable_units(self, num_seqs: int, loss_specific: dict) -> Optional[Tensor]:
        """The prompts' groups ``[B, G]`` when :meth:`separable_call` holds, else None."""
        g = loss_specific.get("group_size") or self.group_size
        if not self.separable_call(loss_specific) or g is None or num_seqs == 0 or num_seqs % g:
            return None
        return torch.arange(num_seqs).view(-1, g)

    def compute_loss(self, batch: SequenceBatch, group_size: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     negatives: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
        g = group_size if group_size is not None else self.group_size
        if g is None:
            raise ValueError("FusedMCPOLoss needs group_size (K + 1 sequences per prompt), in the constructor or "
                             "the call")
        g = check_int("group_size", g, minimum=2)
        b = check_grouped(batch.num_seqs, g)
        logps, ref_logps = batch.logps.view(b, g), batch.ref_logps.view(b, g)
        if negatives is None:
            negatives = self.sample_negatives(logps, ref_logps, generator)
        elif generator is not None:
            raise ValueError("FusedMCPOLoss: pass either negatives (precomputed) or generator (to sample), not both")
        elif isinstance(negatives, torch.Tensor):  # the head checks dtype, shape and range
            negatives = broadcast_from_first(negatives.to(logps.device), self.vocab_parallel_group)
        loss, metrics = losses.mcpo(logps, ref_logps, beta=self.beta, negatives=negatives)
        return loss, {**metrics, "sampling_weights": self.sampling_weights(logps, ref_logps)}
