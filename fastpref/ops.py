"""``fastpref.fused_logprobs``: the one fused op everything else stands on.

entry (``fused_logprobs``: metadata checks, flat view, ``_prepare.check_call``) -> the registered custom op
``torch.ops.fastpref.fused_logprobs`` (value checks, ``_prepare.build_prepared``; a backend's ``forward``;
per-sequence sums) with its autograd formula, whose backward is the custom op
``torch.ops.fastpref.fused_logprobs_backward`` (a backend's ``backward``). Both ops have fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through them without a graph break; the one
autograd path serves every backend.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional, Sequence, Tuple

import torch

from ._prepare import Call, build_prepared, check_call
from ._types import EXTRA_OUTPUTS, IGNORE_INDEX, KernelOptions, LogprobStats, Prepared, reduce_per_sequence

Tensor = torch.Tensor


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
    options: Optional[KernelOptions] = None,
    extra_outputs: Sequence[str] = (),
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
        num_seqs: number of sequences; defaults to ``S`` (padded) or ``seq_ids.max() + 1`` (packed, read
            back to the host: pass ``num_seqs`` to avoid a host sync; required under ``torch.compile``).
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
            Both backends (the Triton forward all-gathers one partial state per rank). The slice
            sizes are all-gathered eagerly in the wrapper (one small collective and host sync per call); the
            op itself receives the group's name.
        options: :class:`fastpref.KernelOptions`: the Triton backend's (deterministic backward, its workspace
            budget) and the backward's gradient filter of both backends (``grad_filter``: off for fp32/fp64
            inputs, a 2**-12 threshold for bf16/fp16 by default; its error bound is in the class docstring);
            None takes the defaults.
        extra_outputs: optional per-position outputs, any subset of ``fastpref._types.EXTRA_OUTPUTS``, all
            of the policy's softmax after the logit map (0 / False at ignored positions): ``"entropy"``
            ``H = -sum_v p_v log p_v`` (differentiable: ``dH/dz_j = -p_j (log p_j + H)``), ``"mean_logits"``
            (mean of the logits over the full vocabulary), ``"is_top1"`` (the target's logit equals the
            maximum) and ``"log_sum_sq_probs"`` (``log sum_v p_v^2``); the last three carry no gradient.
            Off by default; computed in the same pass, memory flat in V, every backend.

    Returns:
        :class:`fastpref.LogprobStats`. Outputs are float32 for fp16/bf16/fp32 inputs and float64
        for float64 inputs. Gradients reach ``hidden``, ``weight`` and ``bias`` from ``logps``,
        ``token_logps``, ``kl``, ``token_kl`` and, when requested, ``entropy``/``token_entropy``. A sequence
        with no valid position gets 0 everywhere. Each extra fills ``token_<name>`` (shape of ``targets``)
        and ``<name>`` (``[num_seqs]`` sums; ``is_top1`` a float count), else they are None.

    Value checks (targets in range, finite biases, ``seq_ids`` in range) raise ``ValueError`` for CPU
    tensors; on CUDA they are device-side assertions (no host sync) unless ``FASTPREF_SYNC_CHECKS=1``.
    """
    call = check_call(
        hidden, weight, targets, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, backend=backend, vocab_parallel_group=vocab_parallel_group, options=options,
        extra_outputs=extra_outputs,
    )
    outs = torch.ops.fastpref.fused_logprobs(*_op_args(call))
    token_logps, ref_token_logps, token_kl, logps, ref_logps, seq_kl, lengths = outs[:7]
    has_ref, has_kl = call.ref_hidden is not None, call.kl is not None

    def shaped(values: Tensor) -> Tensor:
        return values.view(call.target_shape)

    extras = {}
    for i, name in enumerate(EXTRA_OUTPUTS):
        if name in call.extra_outputs:
            per_position = outs[_EXTRA_FIRST + i]
            extras["token_" + name] = shaped(per_position.bool() if name == "is_top1" else per_position)
            extras[name] = outs[_EXTRA_FIRST + len(EXTRA_OUTPUTS) + i]
    return LogprobStats(
        logps=logps, lengths=lengths, token_logps=shaped(token_logps),
        ref_logps=ref_logps if has_ref else None, kl=seq_kl if has_kl else None,
        token_kl=shaped(token_kl) if has_kl else None, ref_token_logps=shaped(ref_token_logps) if has_ref else None,
        **extras,
    )


def _extras_mask(names: Sequence[str]) -> int:
    """The op's ``extras`` scalar: bit i set when ``EXTRA_OUTPUTS[i]`` is requested."""
    return sum(1 << i for i, name in enumerate(EXTRA_OUTPUTS) if name in names)


def _extras_names(mask: int) -> Tuple[str, ...]:
    return tuple(name for i, name in enumerate(EXTRA_OUTPUTS) if mask >> i & 1)


def _op_args(call: Call) -> tuple:
    """The custom op's arguments: tensors, then scalars (a process group travels as its name, the
    options as their fields, ``grad_filter`` resolved to a threshold or None)."""
    return (
        call.hidden, call.weight, call.bias, call.targets, call.seq_ids, call.ref_hidden, call.ref_weight,
        call.ref_bias, call.num_seqs, call.kl, call.temperature, call.softcap, call.ignore_index, call.backend,
        None if call.group is None else call.group.group_name, call.vocab_offset, call.global_vocab,
        call.options.deterministic, call.options.workspace_bytes,
        call.options.filter_threshold(call.hidden.dtype, call.backend), _extras_mask(call.extra_outputs),
    )


def _prepared(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, seq_ids: Optional[Tensor],
              ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
              scalars: tuple, check: bool = True) -> Prepared:
    """The value-checked :class:`Prepared` of the op's arguments (the scalars as :func:`_op_args` orders them)."""
    num_seqs, kl, temperature, softcap, ignore_index, backend, group_name, offset, vocab, det, ws, gf, extras = scalars
    group = None
    if group_name is not None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
    n = targets.shape[0]
    shape = (n,) if seq_ids is not None else (num_seqs, n // num_seqs if num_seqs else 0)
    return build_prepared(Call(
        hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, num_seqs, kl, temperature,
        softcap, ignore_index, backend, offset, vocab,
        KernelOptions(deterministic=det, workspace_bytes=ws, grad_filter=gf), group, shape, _extras_names(extras),
    ), check_values_=check)


def _backend_module(prep: Prepared) -> ModuleType:
    """The launchers of ``prep.backend``; Triton is imported lazily (optional on CPU installs)."""
    if prep.backend == "torch":
        from .backends import torch_backend

        return torch_backend
    from .backends import triton_backend

    triton_backend.check_supported(prep)
    return triton_backend


# ---------------------------------------------------------------------------------------------------
# the forward op: outputs are token_logps, ref_token_logps, token_kl, logps, ref_logps, kl, lengths, lse,
# ref_lse, then the extras per position (EXTRA_OUTPUTS order, ``is_top1`` as 0/1) and per sequence
# ([N] per position, [num_seqs] per sequence; an absent one is an empty tensor). The per-sequence
# sums are formed here from the per-position values, deterministically on every device.

_EXTRA_FIRST = 9  # index of the first extra output
_FORWARD_SCHEMA_OUT = Tuple[(Tensor,) * (_EXTRA_FIRST + 2 * len(EXTRA_OUTPUTS))]


@torch.library.custom_op("fastpref::fused_logprobs", mutates_args=())
def _fused_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, seq_ids: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor], num_seqs: int,
    kl: Optional[str], temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
    group_name: Optional[str], vocab_offset: int, global_vocab: int, deterministic: bool, workspace_bytes: int,
    grad_filter: Optional[float], extras: int,
) -> _FORWARD_SCHEMA_OUT:
    """Real implementation: value checks, the backend's forward, per-sequence sums."""
    prep = _prepared(hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, (
        num_seqs, kl, temperature, softcap, ignore_index, backend, group_name, vocab_offset, global_vocab,
        deterministic, workspace_bytes, grad_filter, extras))
    out = _backend_module(prep).forward(prep)
    empty = out.token_logps.new_empty(0)

    def present(values: Optional[Tensor]) -> Tensor:
        return empty.clone() if values is None else values

    def seq_sum(values: Optional[Tensor]) -> Tensor:
        # Always reduced here (a backend's own epilogue sums, if any, are ignored): deterministic everywhere.
        return empty.clone() if values is None else reduce_per_sequence(prep, values)

    extra_values = [getattr(out, name) if name in prep.extra_outputs else None for name in EXTRA_OUTPUTS]
    return (
        out.token_logps, present(out.ref_token_logps), present(out.token_kl), seq_sum(out.token_logps),
        seq_sum(out.ref_token_logps), seq_sum(out.token_kl), reduce_per_sequence(prep, prep.valid.to(empty.dtype)),
        out.lse, present(out.ref_lse), *(present(v) for v in extra_values), *(seq_sum(v) for v in extra_values),
    )


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@_fused_forward.register_fake
def _fused_forward_fake(hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, num_seqs, kl,
                        *scalars) -> _FORWARD_SCHEMA_OUT:
    """Shapes and dtypes only: [N] per position, [num_seqs] per sequence, empty where absent."""
    n, cd = hidden.shape[0], _compute_dtype(hidden)

    def new(size: Any, present: bool = True) -> Tensor:
        return hidden.new_empty(size if present else 0, dtype=cd)

    has_ref, has_kl = ref_hidden is not None, kl is not None
    wanted = [bool(scalars[-1] >> i & 1) for i in range(len(EXTRA_OUTPUTS))]
    return (new(n), new(n, has_ref), new(n, has_kl), new(num_seqs), new(num_seqs, has_ref), new(num_seqs, has_kl),
            new(num_seqs), new(n), new(n, has_ref), *(new(n, w) for w in wanted), *(new(num_seqs, w) for w in wanted))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias = inputs[:8]
    ctx.scalars = tuple(inputs[8:])
    ctx.set_materialize_grads(False)
    # The inputs are saved too (the backward recomputes the tiles from them): autograd's version check
    # then raises if one is modified in place before the backward.
    ctx.save_for_backward(hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias,
                          output[7], output[8], output[2], output[_EXTRA_FIRST])
    # Of the extras only the entropy (per position and per sequence) has a gradient.
    k = len(EXTRA_OUTPUTS)
    no_grad_extras = [output[_EXTRA_FIRST + j * k + i] for j in range(2) for i in range(1, k)]
    ctx.mark_non_differentiable(output[1], output[4], output[6], output[7], output[8], *no_grad_extras)


def _per_position(per_token: Optional[Tensor], per_seq: Optional[Tensor], seq_ids: Optional[Tensor], n: int,
                  dtype: torch.dtype) -> Optional[Tensor]:
    """A position's upstream gradient: its own plus its sequence's (None when neither exists)."""
    per_token = None if per_token is None or per_token.numel() == 0 else per_token.to(dtype)
    if per_seq is None or per_seq.numel() == 0:
        return per_token
    if seq_ids is not None:
        from_seq = per_seq.to(dtype).index_select(0, seq_ids)
    else:  # padded rows: sequence s owns positions [s * T, (s + 1) * T)
        from_seq = per_seq.to(dtype).unsqueeze(1).expand(per_seq.shape[0], n // per_seq.shape[0]).reshape(n)
    return from_seq if per_token is None else per_token + from_seq


def _backward(ctx, g_token_logps, _g_ref_token, g_token_kl, g_logps, _g_ref_logps, g_kl, *others):
    hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, lse, ref_lse, token_kl, entropy = \
        ctx.saved_tensors
    n, cd, has_kl = targets.shape[0], _compute_dtype(hidden), ctx.scalars[1] is not None
    grad_entropy = None
    if ctx.scalars[-1] & 1:  # the entropy was requested: its per-position and per-sequence gradients
        first = _EXTRA_FIRST - 6  # ``others`` starts at output 6
        grad_entropy = _per_position(others[first], others[first + len(EXTRA_OUTPUTS)], seq_ids, n, cd)
    grad_logps = _per_position(g_token_logps, g_logps, seq_ids, n, cd)
    if grad_logps is None:
        grad_logps = lse.new_zeros(n)
    grad_kl = _per_position(g_token_kl, g_kl, seq_ids, n, cd) if has_kl else None
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    d_hidden, d_weight, d_bias = torch.ops.fastpref.fused_logprobs_backward(
        hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, lse, ref_lse, token_kl,
        grad_logps, grad_kl, *ctx.scalars, *need, entropy, grad_entropy,
    )
    return (d_hidden if need[0] else None, d_weight if need[1] else None, d_bias if need[2] else None,
            *([None] * (len(ctx.scalars) + 5)))


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# the backward op: (d_hidden, d_weight, d_bias) in the inputs' dtypes; one not needed is an empty tensor.


@torch.library.custom_op("fastpref::fused_logprobs_backward", mutates_args=())
def _fused_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, seq_ids: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor], lse: Tensor,
    ref_lse: Tensor, token_kl: Tensor, grad_logps: Tensor, grad_kl: Optional[Tensor], num_seqs: int,
    kl: Optional[str], temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
    group_name: Optional[str], vocab_offset: int, global_vocab: int, deterministic: bool, workspace_bytes: int,
    grad_filter: Optional[float], extras: int, need_hidden: bool, need_weight: bool, need_bias: bool,
    entropy: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Real implementation: the backend's backward (it recomputes the logit tiles). ``entropy`` (saved) and
    ``grad_entropy`` (its upstream gradient) come last, None unless the entropy extra has a gradient."""
    prep = _prepared(hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, (
        num_seqs, kl, temperature, softcap, ignore_index, backend, group_name, vocab_offset, global_vocab,
        deterministic, workspace_bytes, grad_filter, extras), check=False)
    has_ref, has_entropy = ref_hidden is not None, grad_entropy is not None and entropy is not None and extras & 1
    d_hidden, d_weight, d_bias = _backend_module(prep).backward(
        prep, lse, ref_lse if has_ref else None, token_kl if kl else None, grad_logps, grad_kl,
        (need_hidden, need_weight, need_bias), entropy=entropy if has_entropy else None,
        grad_entropy=grad_entropy if has_entropy else None,
    )
    return (
        hidden.new_empty(0) if d_hidden is None else d_hidden.to(hidden.dtype),
        weight.new_empty(0) if d_weight is None else d_weight.to(weight.dtype),
        weight.new_empty(0) if d_bias is None else d_bias.to(bias.dtype),
    )


@_fused_backward.register_fake
def _fused_backward_fake(hidden, weight, bias, targets, seq_ids, ref_hidden, ref_weight, ref_bias, lse, ref_lse,
                         token_kl, grad_logps, grad_kl, num_seqs, kl, temperature, softcap, ignore_index, backend,
                         group_name, vocab_offset, global_vocab, deterministic, workspace_bytes, grad_filter, extras,
                         need_hidden, need_weight, need_bias, entropy=None, grad_entropy=None,
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_bias else weight.new_empty(0),
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastpref.fused_logprobs is once_differentiable: its backward has no gradient of its own "
                       "(double backward, e.g. create_graph=True followed by another backward, is not supported)")


_fused_backward.register_autograd(_no_double_backward)
