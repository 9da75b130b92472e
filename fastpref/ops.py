"""``fastpref.fused_logprobs``: the one fused op everything else stands on."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ._stats import LogprobStats
from ._validate import Prepared, prepare

TokenOutputs = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def _run_backend(prep: Prepared) -> TokenOutputs:
    if prep.backend == "torch":
        from .backends import torch_backend

        return torch_backend.token_stats(prep)
    from .backends import triton_backend  # imported lazily: triton is optional on CPU installs

    return triton_backend.token_stats(prep)


def reduce_per_sequence(prep: Prepared, token_values: torch.Tensor) -> torch.Tensor:
    """Sum per-position values [N] into per-sequence values [num_seqs] (differentiable)."""
    out = torch.zeros(prep.num_seqs, dtype=token_values.dtype, device=token_values.device)
    if prep.padded and prep.num_positions > 0:
        return token_values.view(prep.num_seqs, -1).sum(dim=1)
    return out.index_add(0, prep.seq_ids, token_values)


def assemble(prep: Prepared, token_logps: torch.Tensor, ref_token_logps: Optional[torch.Tensor],
             token_kl: Optional[torch.Tensor]) -> LogprobStats:
    """Build a ``LogprobStats`` from per-position outputs (shared by all backends and the reference)."""
    lengths = reduce_per_sequence(prep, prep.valid.to(token_logps.dtype))
    shape = prep.target_shape
    return LogprobStats(
        logps=reduce_per_sequence(prep, token_logps),
        lengths=lengths,
        token_logps=token_logps.view(shape),
        ref_logps=None if ref_token_logps is None else reduce_per_sequence(prep, ref_token_logps),
        kl=None if token_kl is None else reduce_per_sequence(prep, token_kl),
        token_kl=None if token_kl is None else token_kl.view(shape),
        ref_token_logps=None if ref_token_logps is None else ref_token_logps.view(shape),
    )


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
    num_seqs: Optional[int] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    kl: Optional[str] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_parallel_group: Optional[Any] = None,
) -> LogprobStats:
    """Per-sequence log-probs of ``targets`` under ``softmax(hidden @ weight.T)``, without the logits.

    Fuses the LM-head projection, log-softmax, target gather and per-sequence reduction, block by
    block over positions and vocabulary (online log-sum-exp), so nothing of size [positions x V] is
    ever allocated. Optionally computes the reference model's log-probs and the full-vocabulary
    per-position KL between policy and reference in the same pass.

    Args:
        hidden: ``[S, T, D]`` padded rows (one sequence per row) or ``[N, D]`` packed positions.
        weight: ``[V, D]`` LM-head weight (``nn.Linear`` layout).
        targets: ``[S, T]`` or ``[N]`` integer token ids; position t of ``hidden`` predicts
            ``targets[t]`` (already shifted). ``ignore_index`` excludes a position.
        bias: optional ``[V]`` LM-head bias.
        seq_ids: ``[N]`` sequence id of each packed position, in ``[0, num_seqs)``; required for packed
            input. Sequences may be interleaved and of any length.
        num_seqs: number of sequences; defaults to ``seq_ids.max() + 1`` (packed) or ``S`` (padded).
        ref_hidden: reference model hidden states, same layout as ``hidden`` (treated as constant).
        ref_weight: ``[V, D_ref]`` reference LM head; defaults to ``weight`` (detached) when
            ``ref_hidden`` is given. With the shared head, ``ref_bias`` defaults to ``bias``.
        ref_bias: optional ``[V]`` reference bias.
        kl: ``None``, ``"forward"`` for KL(pi_theta || pi_ref) or ``"reverse"`` for KL(pi_ref || pi_theta),
            full vocabulary, per position, summed per sequence. Needs ``ref_hidden``.
        temperature: logits are divided by it (after the bias, before the softcap).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)``.
        ignore_index: target value marking ignored positions.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        vocab_parallel_group: a ``torch.distributed`` process group over which the LM head is split
            by vocabulary rows (Megatron-style vocabulary parallelism). Each rank passes the same
            ``hidden``/``targets``/``ref_hidden`` (targets are global ids in ``[0, V_global)``) and its
            own contiguous slice of ``weight``/``bias``/``ref_weight``/``ref_bias``, in rank order; slices
            may differ in size. Per position, the running max and sum-exp, the target logit and the KL
            accumulator of each slice are all-reduced (max, then rescaled sums), so every rank gets the
            outputs of the unsharded head: ``lse = M + log(sum_r exp(m_r - M) s_r)`` with ``M = max_r m_r``.
            Backward gives each rank the gradient of its slice of ``weight``/``bias`` and the full
            (all-reduced) gradient of ``hidden``. Every rank of the group must make the same call.
            Torch backend only (``"auto"`` picks it; ``"triton"`` raises ``NotImplementedError``).

    Returns:
        :class:`fastpref.LogprobStats`. Outputs are float32 for fp16/bf16/fp32 inputs and float64
        for float64 inputs. Gradients reach ``hidden``, ``weight`` and ``bias`` from ``logps``,
        ``token_logps``, ``kl`` and ``token_kl``. A sequence with no valid position gets 0 everywhere.
    """
    prep = prepare(
        hidden, weight, targets, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, backend=backend, vocab_parallel_group=vocab_parallel_group,
    )
    if prep.backend == "triton":
        from .backends import triton_backend  # per-sequence sums come from the kernel epilogue

        return triton_backend.logprob_stats(prep)
    return assemble(prep, *_run_backend(prep))
