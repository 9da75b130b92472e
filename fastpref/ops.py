"""``fastpref.fused_logprobs``: the one fused op everything else stands on.

entry (``fused_logprobs``) -> ``prepare`` (validation, flat view) -> :class:`_FusedLogprobs`, the one
autograd Function -> a backend's ``forward`` / ``backward`` launchers (``fastpref/backends``).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from ._prepare import prepare
from ._types import IGNORE_INDEX, LogprobStats, Prepared, assemble, sequence_sums


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
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    vocab_parallel_group: Optional[Any] = None,
) -> LogprobStats:
    """Per-sequence log-probs of ``targets`` under ``softmax(hidden @ weight.T)``, without the logits.

    Fuses the LM-head projection, log-softmax, target gather and per-sequence reduction, block by
    block over positions and vocabulary (online log-sum-exp), so nothing of size [positions x V] is
    ever allocated. Optionally computes the reference model's log-probs and the full-vocabulary
    per-position KL between policy and reference in the same pass. The contract is docs/api.md §1.

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
        backend: ``"auto"`` (Triton for CUDA tensors other than float64, torch otherwise), ``"torch"`` or
            ``"triton"``.
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
    token_logps, ref_token_logps, token_kl, logps, ref_logps, seq_kl = _FusedLogprobs.apply(
        prep.hidden, prep.weight, prep.bias, prep, _backend_module(prep)
    )
    has_ref, has_kl = prep.ref_hidden is not None, prep.kl is not None
    return assemble(
        prep, token_logps, ref_token_logps if has_ref else None, token_kl if has_kl else None,
        logps=logps, ref_logps=ref_logps if has_ref else None, kl=seq_kl if has_kl else None,
    )


def _backend_module(prep: Prepared) -> ModuleType:
    """The launchers of ``prep.backend``; Triton is imported lazily (optional on CPU installs)."""
    if prep.backend == "torch":
        from .backends import torch_backend

        return torch_backend
    from .backends import triton_backend

    triton_backend.check_supported(prep)
    return triton_backend


class _FusedLogprobs(torch.autograd.Function):
    """The op's autograd Function, for every backend.

    Forward runs the backend's forward (per-position values and the log-sum-exps the backward needs)
    and returns the per-position outputs plus their per-sequence sums. Backward folds the gradient of
    each per-sequence sum into its positions (d sum / d token = 1, a gather by ``seq_ids``) and calls
    the backend's backward once, which recomputes the logits tile by tile.

    Outputs: ``token_logps, ref_token_logps, token_kl, logps, ref_logps, kl``; absent ones are empty
    tensors. The reference outputs carry no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prep: Prepared,
                backend: ModuleType):
        out = backend.forward(prep)
        empty = out.token_logps.new_empty(0)

        def seq_sum(values: Optional[torch.Tensor], given: Optional[torch.Tensor]) -> torch.Tensor:
            sums = sequence_sums(prep, values, given)
            return empty.clone() if sums is None else sums

        outputs = (
            out.token_logps,
            empty.clone() if out.ref_token_logps is None else out.ref_token_logps,
            empty.clone() if out.token_kl is None else out.token_kl,
            seq_sum(out.token_logps, out.seq_logps),
            seq_sum(out.ref_token_logps, out.seq_ref_logps),
            seq_sum(out.token_kl, out.seq_kl),
        )
        ctx.prep, ctx.backend = prep, backend
        ctx.set_materialize_grads(False)
        # The inputs go through save_for_backward too (the backward reads them from ``prep``): autograd's
        # version check then raises if one is modified in place before the backward recomputes the tiles.
        ctx.save_for_backward(out.lse, out.ref_lse, out.token_kl, hidden, weight, bias, prep.ref_hidden,
                              prep.ref_weight, prep.ref_bias)
        ctx.mark_non_differentiable(outputs[1], outputs[4])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, g_token_logps, _g_ref_token, g_token_kl, g_logps, _g_ref_logps, g_kl):
        prep: Prepared = ctx.prep
        lse, ref_lse, token_kl = ctx.saved_tensors[:3]
        cd = prep.compute_dtype
        grad_logps = _per_position(prep, g_token_logps, g_logps, cd)
        if grad_logps is None:
            grad_logps = torch.zeros(prep.num_positions, dtype=cd, device=lse.device)
        grad_kl = _per_position(prep, g_token_kl, g_kl, cd) if prep.kl else None
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], prep.bias is not None and ctx.needs_input_grad[2])
        d_hidden, d_weight, d_bias = ctx.backend.backward(prep, lse, ref_lse, token_kl, grad_logps, grad_kl, need)
        return (
            None if d_hidden is None else d_hidden.to(prep.hidden.dtype),
            None if d_weight is None else d_weight.to(prep.weight.dtype),
            None if d_bias is None else d_bias.to(prep.bias.dtype),
            None,
            None,
        )


def _per_position(prep: Prepared, per_token: Optional[torch.Tensor], per_seq: Optional[torch.Tensor],
                  dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A position's upstream gradient: its own plus its sequence's (None when neither exists)."""
    if per_seq is not None and per_seq.numel():
        from_seq = per_seq.to(dtype).index_select(0, prep.seq_ids)
        return from_seq if per_token is None else per_token.to(dtype) + from_seq
    return None if per_token is None else per_token.to(dtype)
