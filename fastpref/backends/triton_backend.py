"""Triton backend of ``fused_logprobs``: the launchers of the kernels in ``fastpref.kernels`` (the
repository's ``csrc_triton/`` folder). The autograd Function is the op's own (``fastpref/ops.py``).

Forward (``logprobs_fwd.py``): one program per block of valid positions streams the
vocabulary in tiles (online log-sum-exp), writes the per-position log-prob, log-sum-exp, reference
log-prob and KL, and atomically adds the per-sequence sums into [num_seqs] buffers. With too few
positions to fill the GPU the vocabulary is also split across programs and ``logprobs_combine.py``
merges the partial states and writes the results. Those sums are the ``seq_*`` fields of the
``ForwardOutputs`` (the contract in ``fastpref/backends/__init__.py``), so the op takes them as given.

Backward (``logprobs_bwd.py``): one program per (positions x vocabulary) tile recomputes
the logits from the saved log-sum-exps, forms ``dz = a (onehot - p) + b dKL/dz`` and accumulates
``dH``, ``dW``, ``db`` in fp32. Positions whose upstream gradients are all zero are never scheduled.

bf16/fp16 inputs feed ``tl.dot`` directly (tensor cores, fp32 accumulation). fp32 inputs use an exact
``ieee`` dot unless TF32 is enabled for fp32 matmuls (``fastpref.kernels.configs.tf32_enabled``: the
``torch.backends.cuda.matmul.fp32_precision`` API, else the legacy ``allow_tf32``), in which case TF32 tensor cores
are used, as for ``torch.matmul``. float64 is not supported here (TypeError): use ``backend="torch"``.

On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
before ``fastpref.kernels`` is first imported): slow, for tests. The interpreter gets fixed small blocks
instead of autotuning, and fp32 copies of half-precision operands (its bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .._types import KL_MODES, ForwardOutputs, Prepared

# Blocks used under the interpreter: one program costs ~1 ms per tile there, so few, big tiles.
INTERPRET_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 32}
INTERPRET_SPLIT_V = 128  # vocabularies above this exercise the split forward + combine kernel
MIN_SPLIT_V = 2048  # fewest vocabulary columns per split on GPU
SPLIT_ALIGN = 256  # split boundaries on multiples of every BLOCK_V
# The kernels' constexpr KL_MODE: the index of the mode in KL_MODES (0 none, 1 forward, 2 reverse).
KL_CODES = {mode: code for code, mode in enumerate(KL_MODES)}


def interpreting() -> bool:
    """True when ``fastpref.kernels`` was imported under ``TRITON_INTERPRET=1`` (kernels run on CPU)."""
    from triton.runtime.jit import JITFunction

    from ..kernels.logprobs_fwd import logprobs_fwd_kernel

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
    from ..kernels.configs import tf32_enabled

    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"  # ignored by tl.dot for bf16/fp16 operands


def _rowmajor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with unit stride along its last dimension (the kernels index rows by a stride, columns by 1):
    a strided or expanded bias, or a transposed weight, becomes a contiguous copy."""
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def _launch(kernel_name: str, grid, *args, **kwargs) -> None:
    """Launch a kernel: autotuned on GPU, with fixed small blocks under the interpreter."""
    from ..kernels import logprobs_bwd, logprobs_combine, logprobs_fwd

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
        from ..kernels.logprobs_fwd import MIN_BLOCK_N

        row_blocks = triton.cdiv(n_rows, MIN_BLOCK_N)
        wanted = max(1, min(triton.cdiv(2 * sms, row_blocks), vocab // MIN_SPLIT_V))
        split_v = triton.cdiv(triton.cdiv(vocab, wanted), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(vocab, split_v), split_v


def forward(prep: Prepared) -> ForwardOutputs:
    """Run the forward kernel over the valid positions of ``prep`` (no autograd)."""
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
    hidden, weight, bias = _rowmajor(prep.hidden), _rowmajor(prep.weight), _rowmajor(prep.bias)
    ref_hidden = _rowmajor(prep.ref_hidden) if has_ref else hidden
    ref_weight = _rowmajor(prep.ref_weight) if has_ref else weight
    ref_bias = _rowmajor(prep.ref_bias) if has_ref else None
    placeholder = out.token_logps  # stands in for absent outputs; never touched (constexpr flags)
    outputs = (out.token_logps, out.lse,
               out.ref_token_logps if has_ref else placeholder, out.ref_lse if has_ref else placeholder,
               out.token_kl if kl else placeholder,
               out.seq_logps, out.seq_ref_logps if has_ref else out.seq_logps, out.seq_kl if kl else out.seq_logps)
    n_splits, split_v = vocab_splits(n_rows, prep.vocab_size, device)
    from ..kernels.logprobs_fwd import PARTIAL_FIELDS

    partials = torch.empty(PARTIAL_FIELDS * n_splits * n_rows if n_splits > 1 else 1, dtype=f32, device=device)
    seq_ids = prep.seq_ids.contiguous()
    _launch(
        "fwd", lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), n_splits),
        hidden, weight, weight if bias is None else bias,
        ref_hidden, ref_weight, ref_weight if ref_bias is None else ref_bias,
        prep.targets.contiguous(), rows, seq_ids, *outputs, partials,
        n_rows, prep.vocab_size, hidden.shape[1], ref_hidden.shape[1], split_v,
        hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
        1.0 / prep.temperature, prep.softcap or 1.0,
        HAS_BIAS=prep.bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=has_ref and prep.ref_bias is not None,
        KL_MODE=KL_CODES[kl], SOFTCAP=prep.softcap is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        REF_DOT_PRECISION=_dot_precision(ref_hidden.dtype),
        SPLIT=n_splits > 1,
    )
    if n_splits > 1:
        _launch("combine", lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]),),
                partials, rows, seq_ids, *outputs, n_rows, n_splits, HAS_REF=has_ref, KL_MODE=KL_CODES[kl])
    return out


def backward(prep: Prepared, lse: torch.Tensor, ref_lse: Optional[torch.Tensor], token_kl: Optional[torch.Tensor],
             grad_logps: torch.Tensor, grad_kl: Optional[torch.Tensor], need: Tuple[bool, bool, bool]):
    """fp32 (dH, dW, db) from upstream per-position gradients (None where not needed)."""
    n, device, f32 = prep.num_positions, prep.hidden.device, torch.float32
    vocab, dim = prep.weight.shape
    need_hidden, need_weight, need_bias = need
    a = grad_logps.to(f32) * prep.valid
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
    hidden, weight, bias = _rowmajor(prep.hidden), _rowmajor(prep.weight), _rowmajor(prep.bias)
    use_ref = kl_mode != 0
    ref_hidden = _rowmajor(prep.ref_hidden) if use_ref else hidden
    ref_weight = _rowmajor(prep.ref_weight) if use_ref else weight
    ref_bias = _rowmajor(prep.ref_bias) if use_ref else None
    dummy = torch.zeros(1, dtype=f32, device=device)
    _launch(
        "bwd", lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"])),
        hidden, weight, weight if bias is None else bias,
        ref_hidden, ref_weight, ref_weight if ref_bias is None else ref_bias,
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
        REF_DOT_PRECISION=_dot_precision(ref_hidden.dtype),
        NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias,
    )
    return d_hidden, d_weight, d_bias
