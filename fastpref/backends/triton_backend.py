"""Triton backend of ``fused_logprobs``: launches the kernels of ``csrc_triton/`` and the autograd glue.

Forward (``csrc_triton/logprobs_fwd.py``): one program per block of valid positions streams the
vocabulary in tiles (online log-sum-exp), writes the per-position log-prob, log-sum-exp, reference
log-prob and KL, and atomically adds the per-sequence sums into [num_seqs] buffers. With too few
positions to fill the GPU the vocabulary is also split across programs and
``csrc_triton/logprobs_combine.py`` merges the partial states and writes the results. Those sums are
the ``logps``/``ref_logps``/``kl`` that ``fused_logprobs(backend="triton")`` returns (see
``logprob_stats``); ``token_stats`` keeps the per-position contract of the other backends.

Backward (``csrc_triton/logprobs_bwd.py``): one program per (positions x vocabulary) tile recomputes
the logits from the saved log-sum-exps, forms ``dz = a (onehot - p) + b dKL/dz`` and accumulates
``dH``, ``dW``, ``db`` in fp32. Positions whose upstream gradients are all zero are never scheduled.

bf16/fp16 inputs feed ``tl.dot`` directly (tensor cores, fp32 accumulation). fp32 inputs use an exact
``ieee`` dot unless ``torch.backends.cuda.matmul.allow_tf32`` is set, in which case TF32 tensor cores
are used, as for ``torch.matmul``. float64 is not supported here (TypeError): use ``backend="torch"``.

On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
before ``csrc_triton`` is first imported): slow, for tests. The interpreter gets fixed small blocks
instead of autotuning, and fp32 copies of half-precision operands (its bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .._stats import LogprobStats
from .._validate import Prepared
from ..ops import reduce_per_sequence

# Blocks used under the interpreter: one program costs ~1 ms per tile there, so few, big tiles.
INTERPRET_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 32}
INTERPRET_SPLIT_V = 128  # vocabularies above this exercise the split forward + combine kernel
MIN_SPLIT_V = 2048  # fewest vocabulary columns per split on GPU
SPLIT_ALIGN = 256  # split boundaries on multiples of every BLOCK_V
KL_CODES = {None: 0, "forward": 1, "reverse": 2}


def interpreting() -> bool:
    """True when ``csrc_triton`` was imported under ``TRITON_INTERPRET=1`` (kernels run on CPU)."""
    from triton.runtime.jit import JITFunction

    from csrc_triton.logprobs_fwd import logprobs_fwd_kernel

    return not isinstance(logprobs_fwd_kernel, JITFunction)


def check_supported(prep: Prepared) -> None:
    """Raise a clear error for inputs the Triton kernels do not take."""
    for name, t in (("hidden", prep.hidden), ("ref_hidden", prep.ref_hidden)):
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"backend='triton' does not take float64 inputs ({name} is float64): the kernels "
                            "accumulate in fp32; use backend='torch' for float64")
    if prep.hidden.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (hidden is on {prep.hidden.device}); use backend='torch' on CPU, "
            "or set TRITON_INTERPRET=1 before importing fastpref to run the kernels in Triton's interpreter"
        )


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for bf16/fp16 operands


def _rowmajor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def _launch(kernel_name: str, grid, *args, **kwargs) -> None:
    """Launch a kernel: autotuned on GPU, with fixed small blocks under the interpreter."""
    from csrc_triton import logprobs_bwd, logprobs_combine, logprobs_fwd

    if kernel_name == "combine":  # elementwise over rows: one fixed configuration
        kernel, cfg = logprobs_combine.logprobs_combine_kernel, logprobs_combine.COMBINE_CONFIG
        if interpreting():
            kernel[grid](*args, BLOCK_N=INTERPRET_BLOCKS["BLOCK_N"], **kwargs)
        else:
            with _device_of(args[0]):
                kernel[grid](*args, **cfg.kwargs, num_warps=cfg.num_warps, **kwargs)
        return
    if interpreting():
        kernel = {"fwd": logprobs_fwd.logprobs_fwd_kernel, "bwd": logprobs_bwd.logprobs_bwd_kernel}[kernel_name]
        kernel[grid](*args, UPCAST=True, **INTERPRET_BLOCKS, **kwargs)
        return
    kernel = {"fwd": logprobs_fwd.logprobs_fwd_autotuned, "bwd": logprobs_bwd.logprobs_bwd_autotuned}[kernel_name]
    with _device_of(args[0]):
        kernel[grid](*args, UPCAST=False, **kwargs)


def _device_of(t: torch.Tensor):
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def vocab_splits(n_rows: int, vocab: int, device: torch.device) -> Tuple[int, int]:
    """(number of vocabulary splits, columns per split) for the forward.

    One program per BLOCK_N positions leaves most SMs idle when there are few positions (a
    preference batch of 4k tokens is 64 row blocks for 132 H100 SMs). Then the vocabulary is split
    so that about two waves of programs run, with at least MIN_SPLIT_V columns per split so the
    partial states stay negligible; ``logprobs_combine`` merges the splits.
    """
    if interpreting():
        split_v = INTERPRET_SPLIT_V
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        row_blocks = triton_cdiv(n_rows, 64)  # the smallest BLOCK_N of the GPU configurations
        wanted = max(1, min(triton_cdiv(2 * sms, row_blocks), vocab // MIN_SPLIT_V))
        split_v = triton_cdiv(triton_cdiv(vocab, wanted), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton_cdiv(vocab, split_v), split_v


@dataclass
class ForwardOutputs:
    """Per-position [N] outputs (0 at ignored positions) and the kernel's per-sequence [S] sums."""

    token_logps: torch.Tensor
    lse: torch.Tensor
    ref_token_logps: Optional[torch.Tensor]
    ref_lse: Optional[torch.Tensor]
    token_kl: Optional[torch.Tensor]
    seq_logps: torch.Tensor
    seq_ref_logps: Optional[torch.Tensor]
    seq_kl: Optional[torch.Tensor]


def forward(prep: Prepared) -> ForwardOutputs:
    """Run the forward kernel over the valid positions of ``prep`` (no autograd)."""
    check_supported(prep)
    n, device, f32 = prep.num_positions, prep.hidden.device, torch.float32
    has_ref, kl = prep.ref_hidden is not None, prep.kl

    def zeros(size: int, wanted: bool = True) -> Optional[torch.Tensor]:
        return torch.zeros(size, dtype=f32, device=device) if wanted else None

    out = ForwardOutputs(
        token_logps=zeros(n), lse=zeros(n), ref_token_logps=zeros(n, has_ref), ref_lse=zeros(n, has_ref),
        token_kl=zeros(n, kl is not None), seq_logps=zeros(prep.num_seqs),
        seq_ref_logps=zeros(prep.num_seqs, has_ref), seq_kl=zeros(prep.num_seqs, kl is not None),
    )
    rows = prep.valid.nonzero().squeeze(1)
    n_rows = rows.numel()
    if n_rows == 0:
        return out
    hidden, weight = _rowmajor(prep.hidden), _rowmajor(prep.weight)
    ref_hidden = _rowmajor(prep.ref_hidden) if has_ref else hidden
    ref_weight = _rowmajor(prep.ref_weight) if has_ref else weight
    placeholder = out.token_logps  # stands in for absent outputs; never touched (constexpr flags)
    outputs = (out.token_logps, out.lse,
               out.ref_token_logps if has_ref else placeholder, out.ref_lse if has_ref else placeholder,
               out.token_kl if kl else placeholder,
               out.seq_logps, out.seq_ref_logps if has_ref else out.seq_logps, out.seq_kl if kl else out.seq_logps)
    n_splits, split_v = vocab_splits(n_rows, prep.vocab_size, device)
    from csrc_triton.logprobs_fwd import PARTIAL_FIELDS

    partials = torch.empty(PARTIAL_FIELDS * n_splits * n_rows if n_splits > 1 else 1, dtype=f32, device=device)
    seq_ids = prep.seq_ids.contiguous()
    _launch(
        "fwd", lambda meta: (triton_cdiv(n_rows, meta["BLOCK_N"]), n_splits),
        hidden, weight, weight if prep.bias is None else prep.bias,
        ref_hidden, ref_weight, ref_weight if prep.ref_bias is None else prep.ref_bias,
        prep.targets.contiguous(), rows, seq_ids, *outputs, partials,
        n_rows, prep.vocab_size, hidden.shape[1], ref_hidden.shape[1], split_v,
        hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
        1.0 / prep.temperature, prep.softcap or 1.0,
        HAS_BIAS=prep.bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=has_ref and prep.ref_bias is not None,
        KL_MODE=KL_CODES[kl], SOFTCAP=prep.softcap is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        SPLIT=n_splits > 1,
    )
    if n_splits > 1:
        _launch("combine", lambda meta: (triton_cdiv(n_rows, meta["BLOCK_N"]),),
                partials, rows, seq_ids, *outputs, n_rows, n_splits, HAS_REF=has_ref, KL_MODE=KL_CODES[kl])
    return out


def backward(prep: Prepared, lse: torch.Tensor, ref_lse: Optional[torch.Tensor], token_kl: Optional[torch.Tensor],
             grad_logps: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor], need_hidden: bool,
             need_weight: bool, need_bias: bool):
    """fp32 (dH, dW, db) from upstream per-position gradients (None where not needed)."""
    n, device, f32 = prep.num_positions, prep.hidden.device, torch.float32
    vocab, dim = prep.weight.shape
    a = torch.zeros(n, dtype=f32, device=device) if grad_logps is None else grad_logps.to(f32) * prep.valid
    b = grad_kl.to(f32) * prep.valid if (prep.kl and grad_kl is not None) else None
    active = a != 0 if b is None else (a != 0) | (b != 0)
    # Skipping zero-gradient positions: only active rows are scheduled (a host-side compaction).
    rows = active.nonzero().squeeze(1)
    n_rows = rows.numel()
    kl_mode = KL_CODES[prep.kl] if (b is not None and bool((b != 0).any())) else 0

    d_hidden = torch.zeros(n, dim, dtype=f32, device=device) if need_hidden else None
    d_weight = torch.zeros(vocab, dim, dtype=f32, device=device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=f32, device=device) if need_bias else None
    if n_rows == 0 or not (need_hidden or need_weight or need_bias):
        return d_hidden, d_weight, d_bias
    hidden, weight = _rowmajor(prep.hidden), _rowmajor(prep.weight)
    use_ref = kl_mode != 0
    ref_hidden = _rowmajor(prep.ref_hidden) if use_ref else hidden
    ref_weight = _rowmajor(prep.ref_weight) if use_ref else weight
    dummy = torch.zeros(1, dtype=f32, device=device)
    _launch(
        "bwd", lambda meta: (triton_cdiv(n_rows, meta["BLOCK_N"]), triton_cdiv(vocab, meta["BLOCK_V"])),
        hidden, weight, weight if prep.bias is None else prep.bias,
        ref_hidden, ref_weight, ref_weight if (not use_ref or prep.ref_bias is None) else prep.ref_bias,
        prep.targets.contiguous(), rows, a, b if use_ref else a, lse,
        ref_lse if use_ref else lse, token_kl if (use_ref and token_kl is not None) else lse,
        dummy if d_hidden is None else d_hidden, dummy if d_weight is None else d_weight,
        dummy if d_bias is None else d_bias,
        n_rows, vocab, dim, ref_hidden.shape[1],
        hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
        dim, dim,
        1.0 / prep.temperature, prep.softcap or 1.0,
        HAS_BIAS=prep.bias is not None, HAS_REF_BIAS=use_ref and prep.ref_bias is not None,
        KL_MODE=kl_mode, SOFTCAP=prep.softcap is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias,
    )
    return d_hidden, d_weight, d_bias


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _TritonLogprobsFn(torch.autograd.Function):
    """Autograd glue: the forward saves per-position log-sum-exps (and KL); the backward recomputes.

    Outputs: per-position (token_logps, ref_token_logps, token_kl) and the kernel's per-sequence
    sums (logps, ref_logps, kl). A gradient on a per-sequence sum reaches each of its positions
    unchanged (d sum / d token = 1), so it is broadcast by ``seq_ids`` and added to the
    per-position gradient before the single backward kernel.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, prep: Prepared):
        out = forward(prep)
        ctx.prep = prep
        # Inputs saved too, for autograd's in-place modification check (the backward reads ``prep``).
        ctx.save_for_backward(out.lse, out.ref_lse, out.token_kl, hidden, weight, bias, prep.ref_hidden,
                              prep.ref_weight, prep.ref_bias)
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        ref_tok = out.ref_token_logps if out.ref_token_logps is not None else empty
        ref_seq = out.seq_ref_logps if out.seq_ref_logps is not None else empty.clone()
        tok_kl = out.token_kl if out.token_kl is not None else empty.clone()
        seq_kl = out.seq_kl if out.seq_kl is not None else empty.clone()
        ctx.mark_non_differentiable(ref_tok, ref_seq)
        return out.token_logps, ref_tok, tok_kl, out.seq_logps, ref_seq, seq_kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_token_logps, g_ref_tok, g_token_kl, g_seq_logps, g_ref_seq, g_seq_kl):
        prep: Prepared = ctx.prep
        lse, ref_lse, token_kl = ctx.saved_tensors[:3]
        grad_logps = _combine(prep, g_token_logps, g_seq_logps)
        grad_kl = _combine(prep, g_token_kl, g_seq_kl) if prep.kl else None
        d_hidden, d_weight, d_bias = backward(
            prep, lse, ref_lse, token_kl, grad_logps, grad_kl,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
            need_bias=prep.bias is not None and ctx.needs_input_grad[2],
        )
        d_hidden = None if d_hidden is None else d_hidden.to(prep.hidden.dtype)
        d_weight = None if d_weight is None else d_weight.to(prep.weight.dtype)
        d_bias = None if d_bias is None else d_bias.to(prep.bias.dtype)
        return d_hidden, d_weight, d_bias, None


def _combine(prep: Prepared, per_token: Optional[torch.Tensor], per_seq: Optional[torch.Tensor]):
    """Per-position upstream gradient: its own plus its sequence's (None when neither exists)."""
    if per_seq is not None and per_seq.numel():
        from_seq = per_seq.float().index_select(0, prep.seq_ids)
        return from_seq if per_token is None else per_token.float() + from_seq
    return per_token


def _run(prep: Prepared):
    """(token_logps, ref_token_logps, token_kl, logps, ref_logps, kl); absent ones None."""
    check_supported(prep)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (prep.hidden, prep.weight, prep.bias)
    )
    if not needs_grad:
        # No graph: nothing is saved for a backward that cannot happen.
        with torch.no_grad():
            o = forward(prep)
        return o.token_logps, o.ref_token_logps, o.token_kl, o.seq_logps, o.seq_ref_logps, o.seq_kl
    outs = _TritonLogprobsFn.apply(prep.hidden, prep.weight, prep.bias, prep)
    has_ref, kl = prep.ref_hidden is not None, prep.kl is not None
    keep = (True, has_ref, kl, True, has_ref, kl)
    return tuple(o if k else None for o, k in zip(outs, keep))


def token_stats(prep: Prepared):
    """Per-position (token_logps, ref_token_logps, token_kl) for ``prep`` (see backends/__init__)."""
    token_logps, ref_token_logps, token_kl, _, _, _ = _run(prep)
    return token_logps, ref_token_logps, token_kl


def logprob_stats(prep: Prepared) -> LogprobStats:
    """The full :class:`LogprobStats` with the per-sequence sums taken from the forward kernel's epilogue
    (atomic adds by ``seq_ids``) instead of a separate reduction; what ``fused_logprobs`` returns for
    ``backend="triton"``."""
    token_logps, ref_token_logps, token_kl, logps, ref_logps, kl = _run(prep)
    shape = prep.target_shape
    return LogprobStats(
        logps=logps,
        lengths=reduce_per_sequence(prep, prep.valid.to(torch.float32)),
        token_logps=token_logps.view(shape),
        ref_logps=ref_logps,
        kl=kl,
        token_kl=None if token_kl is None else token_kl.view(shape),
        ref_token_logps=None if ref_token_logps is None else ref_token_logps.view(shape),
    )
