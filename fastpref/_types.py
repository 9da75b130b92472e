"""The types every layer shares, and the per-sequence reduction: the bottom of the package.

- :class:`Prepared`: the flat, validated view of one :func:`fastpref.fused_logprobs` call (built by
  ``fastpref._prepare.prepare``), which is all a backend reads.
- :class:`ForwardOutputs`: what a backend's ``forward`` returns (the backend contract is in
  ``fastpref/backends/__init__.py``).
- :class:`LogprobStats`: the op's public result, built by :func:`assemble`.

Nothing here imports another fastpref module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

#: The one default of ``ignore_index`` (PyTorch's cross-entropy convention); every layer reads it here.
IGNORE_INDEX = -100
#: ``kl`` modes of the op: none, KL(pi_theta || pi_ref) or KL(pi_ref || pi_theta).
KL_MODES = (None, "forward", "reverse")
#: Optional per-position outputs of ``fused_logprobs(..., extra_outputs=...)``, all of the policy's softmax
#: (after the head's logit map): entropy (differentiable), mean logit over the full vocabulary, whether the
#: target is the top-1 token, and ``log sum_v p_v^2``.
EXTRA_OUTPUTS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
#: Default budget of the Triton backward's ``dz`` workspace (see :class:`KernelOptions`).
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
#: The threshold ``KernelOptions(grad_filter="auto")`` takes for bf16/fp16 inputs: bf16's epsilon 2**-7 / 32.
#: A skipped entry is then at most 2**-12 |g| (``g`` the row's upstream gradient), 8x below the bf16 rounding
#: error 2**-9 |g| that eager autograd already makes on the row's target entry ``g (1 - p)`` (for p <= 1/2);
#: 2**-7 itself would drop entries 4x above that rounding, and whole rows of a flat softmax over V < 4096.
GRAD_FILTER_AUTO = 2.0 ** -12


@dataclass(frozen=True)
class KernelOptions:
    """How the backward runs (``fused_logprobs(..., options=KernelOptions(...))``). ``deterministic`` and
    ``workspace_bytes`` are the Triton backend's (the torch backend, deterministic by construction and tiled by
    its own block sizes, ignores them); ``grad_filter`` applies to both backends.

    Attributes:
        deterministic: True (default): the backward recomputes the logits gradient ``dz`` one vocabulary
            chunk at a time into a workspace and lets cuBLAS form ``dH`` and ``dW`` from it: no atomics,
            bitwise-equal gradients run to run. False: one fused kernel adds its tiles into ``dH``/``dW``
            with (relaxed) fp32 atomics: no workspace, last-bit nondeterminism.
        workspace_bytes: the budget of the deterministic backward's ``dz`` chunk (``positions x columns``
            in the input dtype, fp32 for fp32 inputs); it sets how many vocabulary columns one chunk covers
            (at least 256). The fp32 ``dH`` accumulator (``positions x D``) comes on top of it.
        grad_filter: gradient filtering threshold ``t`` of the backward: None (off: exact), a float in (0, 1), or
            ``"auto"`` (default): :data:`GRAD_FILTER_AUTO` for bf16/fp16 inputs, off for fp32/fp64 (exact). It
            applies where it saves work: the torch backend and Triton's ``deterministic=False`` backward. The
            deterministic Triton backward is always exact: its cuBLAS GEMMs span whole chunks of ``dz``, so a filter
            there would cost accuracy and save nothing. An entry ``(i, v)`` of the logits gradient ``dz`` is *small*
            when ``|dz_iv| <= t * s_i`` with ``s_i = (|a_i| + |b_i| + |c_i|) / T``, the row's upstream gradients of
            ``token_logps``, ``token_kl`` and the entropy (those that have one); for a log-prob-only gradient (DPO
            and its kin) that is ``p_iv * phi_iv <= t`` (``phi <= 1`` the softcap's slope, 1 without one). A tile
            whose non-target entries are all small is skipped: only its target entries (the one-hot term, never
            dropped) reach ``dH``/``dW``/``db``, and its GEMM work is not done (torch backend: per row of a
            ``BLOCK_V`` slice, whose target entry is added on its own, when at most 3/4 of the block's rows remain;
            Triton atomic backward: per ``BLOCK_N x BLOCK_V`` tile, and a tile holding a target is never skipped).
            Error bound, with ``S_i`` the skipped entries of row ``i`` (each ``|dz_iv| <= t s_i``): ``||ddH_i|| <=
            sum_{v in S_i} |dz_iv| ||w_v||``, ``||ddW_v|| <= sum_{i: v in S_i} |dz_iv| ||h_i||``, ``|ddb_v| <=
            sum_{i: v in S_i} |dz_iv|``; for a log-prob-only gradient ``||ddH_i|| <= (|a_i| / T) * P_i * max_v
            ||w_v||`` with ``P_i`` the skipped softmax mass (``P_i <= min(1, t |S_i|)``). A peaked (trained)
            softmax has tiles whose entries are all small at a tiny ``P_i`` (how many, depends on the tile size);
            a flat softmax over ``V > 1 / t`` columns has every entry small, so nearly all of its mass can be
            skipped (``bench/grad_filter.py`` measures both).
        grad_in_forward: read by the loss modules, not by the op (``FusedDPOLoss(kernel_options=...)``). True: a
            module whose loss is a sum of independent per-pair terms (the DPO family without batch-sorting loss
            types or WPO, IPO, SimPO, SLiC, DPOP, ORPO without ``nll_targets``, CPO, MC-PO given ``negatives``) forms
            ``dH``, ``dW`` and ``db`` in its forward, one group of whole pairs (or prompts) at a time while the
            group's logits are in memory, and its
            backward only scales them by the upstream gradient: four GEMMs (policy and reference logits, ``dH``,
            ``dW``) instead of five (the recompute). The price is memory: a group's ``[rows x V]`` logits
            (``workspace_bytes`` bounds them; a pair that does not fit falls back to the recompute), so the
            workspace is no longer flat in V. Exact (fp32/fp64: the recompute's gradients up to round-off). Falls
            back to the recompute, silently and exactly, where the conditions do not hold (batch-coupled losses,
            a softcap, vocabulary parallelism, no gradient needed, extra outputs on the Triton backend; docs/api.md
            §3.1);
            ``fastpref.modules.grad_in_forward.LAST_PATH`` says which path the last call took and why. Default
            False.
    """

    deterministic: bool = True
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    grad_filter: Union[float, str, None] = "auto"
    grad_in_forward: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"KernelOptions.deterministic must be a bool, got {self.deterministic!r}")
        if isinstance(self.workspace_bytes, bool) or not isinstance(self.workspace_bytes, int) \
                or self.workspace_bytes <= 0:
            raise ValueError(f"KernelOptions.workspace_bytes must be a positive int, got {self.workspace_bytes!r}")
        if not isinstance(self.grad_in_forward, bool):
            raise TypeError(f"KernelOptions.grad_in_forward must be a bool, got {self.grad_in_forward!r}")
        t = self.grad_filter
        if isinstance(t, str):
            if t != "auto":
                raise ValueError(f"KernelOptions.grad_filter must be None, 'auto' or a float in (0, 1), got {t!r}")
        elif t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0):
            raise ValueError(f"KernelOptions.grad_filter must be None, 'auto' or a float in (0, 1), got {t!r}")

    def filter_threshold(self, dtype: torch.dtype, backend: str) -> Optional[float]:
        """The gradient filter's threshold for inputs of ``dtype`` on ``backend`` ("torch" or "triton"), or
        None when filtering is off (``grad_filter="auto"`` resolved as documented above)."""
        if self.grad_filter is None:
            return None
        if backend == "triton" and self.deterministic:
            return None
        if self.grad_filter != "auto":
            return float(self.grad_filter)
        return GRAD_FILTER_AUTO if dtype in (torch.bfloat16, torch.float16) else None


@dataclass(frozen=True)
class Prepared:
    """The flat, validated view of one ``fused_logprobs`` call: positions ``[N, D]``, one target and
    one sequence id per position. Backends read nothing else."""

    hidden: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [V, D] (this rank's vocabulary slice under vocabulary parallelism)
    bias: Optional[torch.Tensor]  # [V]
    targets: torch.Tensor  # [N] int64, ignored positions kept as they were given
    valid: torch.Tensor  # [N] bool, False at ignored positions
    seq_ids: torch.Tensor  # [N] int64 in [0, num_seqs)
    num_seqs: int
    target_shape: Tuple[int, ...]
    padded: bool  # [S, T] input: seq_ids is arange(S).repeat_interleave(T)
    ref_hidden: Optional[torch.Tensor]  # [N, D_ref], detached
    ref_weight: Optional[torch.Tensor]  # [V, D_ref], detached
    ref_bias: Optional[torch.Tensor]  # [V], detached
    kl: Optional[str]  # one of KL_MODES
    temperature: float
    softcap: Optional[float]
    backend: str  # resolved: "torch" or "triton"
    # Vocabulary parallelism: ``weight``/``bias`` hold rows [vocab_offset, vocab_offset + V) of a
    # vocabulary split across ``vocab_parallel_group``; targets are global ids.
    vocab_parallel_group: Optional[Any] = None
    vocab_offset: int = 0
    options: KernelOptions = KernelOptions()
    extra_outputs: Tuple[str, ...] = ()  # a subset of EXTRA_OUTPUTS, in EXTRA_OUTPUTS order
    global_vocab: Optional[int] = None  # V over every rank of vocab_parallel_group (None: vocab_size)

    @property
    def num_positions(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        """This rank's vocabulary size (the whole vocabulary without a vocab-parallel group)."""
        return self.weight.shape[0]

    @property
    def total_vocab(self) -> int:
        """The whole vocabulary's size (all ranks of a vocabulary-parallel group)."""
        return self.vocab_size if self.global_vocab is None else self.global_vocab

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp64 stays fp64; everything else computes in fp32 blocks."""
        return torch.float64 if self.hidden.dtype == torch.float64 else torch.float32


@dataclass
class ForwardOutputs:
    """A backend's forward: per-position ``[N]`` vectors in the compute dtype, 0 at ignored positions.

    ``lse``/``ref_lse`` (log-sum-exps) and ``token_kl`` are what the backward recomputes from. The
    per-sequence sums ``seq_*`` are optional, and the op ignores them: it reduces the per-position values
    itself (:func:`reduce_per_sequence`, deterministic on every device).

    The extras (each None unless named in ``Prepared.extra_outputs``) are of the policy's softmax over the
    full (global) vocabulary: ``entropy`` H, ``mean_logits``, ``is_top1`` (1.0 where the target's logit
    equals the maximum, else 0.0) and ``log_sum_sq_probs`` (log sum_v p_v^2); the backward reads the saved
    ``entropy``.
    """

    token_logps: torch.Tensor
    lse: torch.Tensor
    ref_token_logps: Optional[torch.Tensor] = None
    ref_lse: Optional[torch.Tensor] = None
    token_kl: Optional[torch.Tensor] = None
    seq_logps: Optional[torch.Tensor] = None
    seq_ref_logps: Optional[torch.Tensor] = None
    seq_kl: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None


@dataclass
class LogprobStats:
    """Per-sequence and per-position log-prob statistics: float32 for fp16/bf16/fp32 inputs, float64 for
    float64 inputs (a deliberate extension of the contract's float32, docs/api.md §1, so that fp64
    gradient checks can be tight; nothing changes for half or single precision).

    Attributes:
        logps: [num_seqs] sum of log pi_theta(target) over non-ignored positions (differentiable).
        lengths: [num_seqs] number of non-ignored positions (no grad).
        token_logps: shape of ``targets``; per-position log-prob, 0 at ignored positions.
        ref_logps: [num_seqs] reference log-probs when ``ref_hidden`` was given, else None (no grad).
        kl: [num_seqs] per-sequence sum of the full-vocabulary KL when ``kl`` was set, else None.
        token_kl: shape of ``targets``; per-position KL, 0 at ignored positions, or None.
        ref_token_logps: shape of ``targets``; per-position reference log-prob, or None (no grad).

    Requested with ``extra_outputs`` (else None), all of the policy's softmax, 0 / False at ignored positions:
        token_entropy: shape of ``targets``; entropy ``H = -sum_v p_v log p_v`` (differentiable).
        token_mean_logits: mean of the (transformed) logits over the full vocabulary (no grad).
        token_is_top1: bool; True where the target's logit equals the maximum logit (no grad).
        token_log_sum_sq_probs: ``log sum_v p_v^2`` (no grad).
        entropy, mean_logits, log_sum_sq_probs: [num_seqs] sums of the per-position values over the
            non-ignored positions (``entropy`` differentiable).
        is_top1: [num_seqs] float count of the top-1 positions.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    token_kl: Optional[torch.Tensor] = None
    ref_token_logps: Optional[torch.Tensor] = None
    token_entropy: Optional[torch.Tensor] = None
    token_mean_logits: Optional[torch.Tensor] = None
    token_is_top1: Optional[torch.Tensor] = None
    token_log_sum_sq_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None


def reduce_per_sequence(prep: Prepared, values: torch.Tensor) -> torch.Tensor:
    """Sum per-position values ``[N]`` into per-sequence values ``[num_seqs]`` (differentiable).

    Padded rows sum along a view. Packed positions: ``index_add`` on CPU; on other devices its atomics
    would make the sums differ run to run, so :func:`segment_sums_deterministic` is used there.
    """
    if prep.padded and prep.num_positions > 0:
        return values.view(prep.num_seqs, -1).sum(dim=1)
    if values.device.type not in ("cpu", "meta"):
        return segment_sums_deterministic(values, prep.seq_ids, prep.num_seqs)
    out = torch.zeros(prep.num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, prep.seq_ids, values)


def segment_sums_deterministic(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = sum(values[seq_ids == s])``, bitwise reproducible on any device (differentiable).

    Positions are stably sorted by sequence, then a segmented inclusive scan doubles its reach each step
    (``x[i] += x[i - d]`` while both lie in one sequence): ``ceil(log2 N)`` elementwise passes with a fixed
    order of additions -- no atomics, and no floating ``cumsum`` (whose CUDA scan is not deterministic).
    Each sequence's sum is then read at its last position. Accumulates in float64.
    """
    n = values.shape[0]
    seqs = torch.arange(num_seqs, device=values.device)
    if n == 0:
        return torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    order = torch.argsort(seq_ids, stable=True)
    ids, x = seq_ids.index_select(0, order), values.index_select(0, order).to(torch.float64)
    step = 1
    while step < n:
        same = ids[step:] == ids[:-step]
        x = torch.cat([x[:step], x[step:] + torch.where(same, x[:-step], torch.zeros_like(x[:-step]))])
        step *= 2
    # One past the last position of sequence s (== its first position when it is empty).
    end, start = torch.searchsorted(ids, seqs, right=True), torch.searchsorted(ids, seqs)
    last = x.index_select(0, (end - 1).clamp(min=0))
    return torch.where(end > start, last, torch.zeros_like(last)).to(values.dtype)


def sequence_sums(prep: Prepared, values: Optional[torch.Tensor],
                  given: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Per-sequence sums of ``values``: ``given`` when a kernel epilogue already formed them, else reduced."""
    if values is None:
        return None
    return given if given is not None else reduce_per_sequence(prep, values)


def assemble(prep: Prepared, token_logps: torch.Tensor, ref_token_logps: Optional[torch.Tensor] = None,
             token_kl: Optional[torch.Tensor] = None, *, logps: Optional[torch.Tensor] = None,
             ref_logps: Optional[torch.Tensor] = None, kl: Optional[torch.Tensor] = None,
             extras: Optional[Dict[str, torch.Tensor]] = None) -> LogprobStats:
    """Build a ``LogprobStats`` from per-position outputs; per-sequence sums already formed (a kernel
    epilogue's) are taken as given, the others are reduced here. ``extras`` maps names of
    :data:`EXTRA_OUTPUTS` to per-position ``[N]`` values (``is_top1`` as 0/1 floats)."""
    def shaped(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if values is None else values.view(prep.target_shape)

    extra_fields: Dict[str, torch.Tensor] = {}
    for name, values in (extras or {}).items():
        extra_fields[name] = reduce_per_sequence(prep, values)
        extra_fields["token_" + name] = shaped(values.bool() if name == "is_top1" else values)
    return LogprobStats(**extra_fields,
        logps=sequence_sums(prep, token_logps, logps),
        lengths=reduce_per_sequence(prep, prep.valid.to(token_logps.dtype)),
        token_logps=shaped(token_logps),
        ref_logps=sequence_sums(prep, ref_token_logps, ref_logps),
        kl=sequence_sums(prep, token_kl, kl),
        token_kl=shaped(token_kl),
        ref_token_logps=shaped(ref_token_logps),
    )
