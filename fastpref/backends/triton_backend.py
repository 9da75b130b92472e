"""Triton backend of ``fused_logprobs``: the launchers of the kernels in ``fastpref.kernels`` (the
repository's ``csrc_triton/`` folder). The autograd Function is the op's own (``fastpref/ops.py``).

Forward (``logprobs_fwd.py``): one program per block of valid positions streams the vocabulary in tiles
(online log-sum-exp) and writes the per-position log-prob, log-sum-exp, reference log-prob and KL. With
too few positions to fill the GPU, or with a vocabulary-parallel head, the vocabulary is also split
across programs (or ranks) and ``logprobs_combine.py`` merges the partial states. The per-sequence sums
are the op's (a deterministic reduction).

Backward, by default (``KernelOptions.deterministic``): for each chunk of vocabulary columns,
``logprobs_dz.py`` recomputes the logits from the saved log-sum-exps and writes the chunk's logits
gradient ``dz`` (``[positions, columns]``, in the input dtype as eager autograd rounds it), then cuBLAS
forms ``dH += dz @ W[chunk]`` into an fp32 accumulator and ``dW[chunk] = dz^T @ H`` (one GEMM per chunk
with fp32 accumulation, rounded once, as eager) and ``db[chunk] = sum(dz)``. No atomics: the same bits
every run. The chunk width comes from ``KernelOptions.workspace_bytes``. The chunks run over columns,
not rows, because ``dW[chunk]`` is then complete after one GEMM: a row chunking would add every chunk's
``[V, D]`` product into an fp32 accumulator, and cuBLAS has no in-place fp32-output GEMM for bf16 inputs
(``torch.addmm(..., out_dtype=float32, out=...)`` is broken, pytorch#154086), so that would cost a
``[V, D]`` fp32 temporary per chunk. With ``deterministic=False`` one fused kernel (``logprobs_bwd.py``)
adds its tiles into dH/dW/db with relaxed fp32 atomics instead: no workspace, last-bit nondeterminism.
``KernelOptions.grad_filter`` reaches the atomic kernel as the constexpr ``FILTER_EPS`` (0.0: off), which skips
the GEMMs and atomics of the tiles it filters; the deterministic backward is always exact (filtering would zero
tiles of ``dz`` but save none of the cuBLAS work over whole chunks).

No host synchronization: the positions are compacted on the device (those with work first, their count
in a device scalar the kernels read), every grid is sized by the number of positions, and programs past
the count return at once. The cuBLAS GEMMs of the deterministic backward run over every position (the
rows without gradient are zeros), since their count is a device value.

bf16/fp16 inputs feed ``tl.dot`` directly (tensor cores, fp32 accumulation). fp32 inputs use an exact
``ieee`` dot unless TF32 is enabled for fp32 matmuls (``fastpref.kernels.configs.tf32_enabled``: the
``torch.backends.cuda.matmul.fp32_precision`` API, else the legacy ``allow_tf32``), in which case TF32 tensor
cores are used, as for ``torch.matmul``. Each head (policy, reference) gets the precision and config column
of its own dtype. float64 is not supported here (TypeError): use ``backend="torch"``.

On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
before ``fastpref.kernels`` is first imported): slow, for tests. The interpreter gets fixed small blocks
instead of autotuning, fp32 copies of half-precision operands (its bf16 ``tl.dot`` is wrong) and an fp32
``dz`` workspace.
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
CHUNK_ALIGN = 256  # backward chunk widths too
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
    from ..kernels import logprobs_bwd, logprobs_combine, logprobs_dz, logprobs_fwd

    if kernel_name == "combine":  # elementwise over rows: one fixed configuration
        kernel, cfg = logprobs_combine.logprobs_combine_kernel, logprobs_combine.COMBINE_CONFIG
        if interpreting():
            kernel[grid](*args, BLOCK_N=INTERPRET_BLOCKS["BLOCK_N"], **kwargs)
        else:
            with _device_of(args[0]):
                kernel[grid](*args, **cfg.kwargs, num_warps=cfg.num_warps, **kwargs)
        return
    modules = {"fwd": (logprobs_fwd, "logprobs_fwd"), "dz": (logprobs_dz, "logprobs_dz"),
               "bwd": (logprobs_bwd, "logprobs_bwd")}
    module, name = modules[kernel_name]
    if interpreting():
        getattr(module, name + "_kernel")[grid](*args, UPCAST=True, **INTERPRET_BLOCKS, **kwargs)
        return
    with _device_of(args[0]):
        getattr(module, name + "_autotuned")[grid](*args, UPCAST=False, **kwargs)


def _device_of(t: torch.Tensor):
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def rows_bucket(n_rows: int) -> int:
    """The autotune key's row count: ``n_rows`` rounded up to a power of two (at least 64)."""
    return max(64, triton.next_power_of_2(max(n_rows, 1)))


def compact(active: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions with ``active`` first, then the others, each in order; their count as an int32 [1]
    device tensor), without a host sync: the kernels read the count and skip the rest."""
    order = torch.argsort((~active).to(torch.int8), stable=True)
    return order, active.sum(dtype=torch.int32).reshape(1)


def vocab_splits(n_rows: int, vocab: int, device: torch.device) -> Tuple[int, int]:
    """(number of vocabulary splits, columns per split) for the forward over ``n_rows`` positions.

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


class _Heads:
    """The row-major operands of both heads as the kernels take them (the policy head stands in for an
    absent reference: the kernels never read it then, by their constexpr flags)."""

    def __init__(self, prep: Prepared, use_ref: bool):
        self.hidden, self.weight, self.bias = _rowmajor(prep.hidden), _rowmajor(prep.weight), _rowmajor(prep.bias)
        self.ref_hidden = _rowmajor(prep.ref_hidden) if use_ref else self.hidden
        self.ref_weight = _rowmajor(prep.ref_weight) if use_ref else self.weight
        self.ref_bias = _rowmajor(prep.ref_bias) if use_ref else None
        self.flags = dict(HAS_BIAS=prep.bias is not None, HAS_REF_BIAS=self.ref_bias is not None,
                          SOFTCAP=prep.softcap is not None, DOT_PRECISION=_dot_precision(self.hidden.dtype),
                          REF_DOT_PRECISION=_dot_precision(self.ref_hidden.dtype))
        self.scalars = (1.0 / prep.temperature, prep.softcap or 1.0)

    def pointers(self) -> tuple:
        return (self.hidden, self.weight, self.weight if self.bias is None else self.bias,
                self.ref_hidden, self.ref_weight, self.ref_weight if self.ref_bias is None else self.ref_bias)

    def strides(self) -> tuple:
        return self.hidden.stride(0), self.weight.stride(0), self.ref_hidden.stride(0), self.ref_weight.stride(0)


def forward(prep: Prepared) -> ForwardOutputs:
    """Run the forward kernel over the valid positions of ``prep`` (no autograd, no host sync)."""
    n, device, f32 = prep.num_positions, prep.hidden.device, torch.float32
    has_ref, kl = prep.ref_hidden is not None, prep.kl

    def zeros(wanted: bool = True) -> Optional[torch.Tensor]:
        return torch.zeros(n, dtype=f32, device=device) if wanted else None

    out = ForwardOutputs(token_logps=zeros(), lse=zeros(), ref_token_logps=zeros(has_ref), ref_lse=zeros(has_ref),
                         token_kl=zeros(kl is not None))
    if n == 0:
        return out
    heads = _Heads(prep, has_ref)
    rows, n_active = compact(prep.valid)
    placeholder = out.token_logps  # stands in for absent outputs; never touched (constexpr flags)
    outputs = (out.token_logps, out.lse, out.ref_token_logps if has_ref else placeholder,
               out.ref_lse if has_ref else placeholder, out.token_kl if kl else placeholder)
    extras = bool(prep.extra_outputs)  # all four planes are computed when any extra is requested
    extras_buf = torch.zeros(4, n, dtype=f32, device=device) if extras else placeholder
    group = prep.vocab_parallel_group
    # A vocabulary-parallel head gives one split per rank; the ranks' partial states are all-gathered.
    n_splits, split_v = (1, prep.vocab_size) if group is not None else vocab_splits(n, prep.vocab_size, device)
    from ..kernels.logprobs_fwd import EXTRA_FIELDS, PARTIAL_FIELDS

    split = n_splits > 1 or group is not None
    fields = PARTIAL_FIELDS + (EXTRA_FIELDS if extras else 0)
    partials = torch.empty((fields, n_splits, n) if split else (1,), dtype=f32, device=device)
    flags = dict(heads.flags, HAS_REF=has_ref, KL_MODE=KL_CODES[kl], SPLIT=split, EXTRAS=extras)
    _launch(
        "fwd", lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), n_splits),
        *heads.pointers(), prep.targets.contiguous(), rows, n_active, *outputs, partials, extras_buf,
        n, rows_bucket(n), prep.vocab_size, heads.hidden.shape[1], heads.ref_hidden.shape[1], split_v,
        prep.vocab_offset, *heads.strides(), *heads.scalars, **flags,
    )
    if split:
        if group is not None:
            partials = _gather_partials(partials, group)
            n_splits = partials.shape[1]
        _launch("combine", lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
                partials, rows, n_active, *outputs, extras_buf, n, n_splits, HAS_REF=has_ref, KL_MODE=KL_CODES[kl],
                EXTRAS=extras)
    if extras:
        # separate tensors (the op's outputs may not alias each other)
        planes = dict(entropy=extras_buf[0].clone(), mean_logits=extras_buf[1] / prep.total_vocab,
                      is_top1=extras_buf[2].clone(), log_sum_sq_probs=extras_buf[3].clone())
        for name in prep.extra_outputs:
            setattr(out, name, planes[name])
    return out


def _gather_partials(partials: torch.Tensor, group) -> torch.Tensor:
    """[fields, 1, N] per rank -> [fields, ranks, N]: every rank's slice becomes one split of the combine."""
    import torch.distributed as dist

    gathered = [torch.empty_like(partials) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, partials.contiguous(), group=group)
    return torch.cat(gathered, dim=1).contiguous()


def backward(prep: Prepared, lse: torch.Tensor, ref_lse: Optional[torch.Tensor], token_kl: Optional[torch.Tensor],
             grad_logps: torch.Tensor, grad_kl: Optional[torch.Tensor], need: Tuple[bool, bool, bool], *,
             entropy: Optional[torch.Tensor] = None, grad_entropy: Optional[torch.Tensor] = None):
    """(dH fp32, dW, db fp32) from upstream per-position gradients (None where not needed); dW is fp32, or in
    the weight's dtype from the deterministic backward (one cuBLAS GEMM rounds it once, as eager does).
    ``grad_entropy`` (with the saved ``entropy``) is the upstream gradient of the entropy extra, or None."""
    n, f32 = prep.num_positions, torch.float32
    a = grad_logps.to(f32) * prep.valid
    use_kl = prep.kl is not None and grad_kl is not None
    b = grad_kl.to(f32) * prep.valid if use_kl else a  # ``a`` stands in when the KL has no gradient
    use_ent = grad_entropy is not None and entropy is not None
    c = grad_entropy.to(f32) * prep.valid if use_ent else a  # likewise for the entropy
    if n == 0 or not any(need):
        return _zero_grads(prep, need)
    active = (a != 0) | (b != 0) if use_kl else a != 0
    rows, n_active = compact(active | (c != 0) if use_ent else active)
    heads = _Heads(prep, use_kl)
    saved = (lse, ref_lse if use_kl else lse, token_kl if (use_kl and token_kl is not None) else lse, c,
             entropy.to(f32) if use_ent else lse)
    flags = dict(heads.flags, KL_MODE=KL_CODES[prep.kl] if use_kl else 0, ENTROPY=use_ent)
    if prep.options.deterministic:
        d_hidden, d_weight, d_bias = _backward_chunked(prep, heads, rows, n_active, (a, b, *saved), flags, need)
    else:
        flags["FILTER_EPS"] = prep.options.filter_threshold(prep.hidden.dtype, "triton") or 0.0
        d_hidden, d_weight, d_bias = _backward_atomic(prep, heads, rows, n_active, (a, b, *saved), flags, need)
    if d_hidden is not None and prep.vocab_parallel_group is not None:
        import torch.distributed as dist

        # dH is a sum over the vocabulary: each rank of the group holds the part from its slice.
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=prep.vocab_parallel_group)
    return d_hidden, d_weight, d_bias


def _zero_grads(prep: Prepared, need: Tuple[bool, bool, bool]):
    (n, dim), vocab, device = prep.hidden.shape, prep.vocab_size, prep.hidden.device

    def zeros(*shape: int, wanted: bool) -> Optional[torch.Tensor]:
        return torch.zeros(*shape, dtype=torch.float32, device=device) if wanted else None

    d_hidden = zeros(n, dim, wanted=need[0])
    if d_hidden is not None and prep.vocab_parallel_group is not None:
        import torch.distributed as dist

        dist.all_reduce(d_hidden, group=prep.vocab_parallel_group)  # every rank of the group joins
    return d_hidden, zeros(vocab, dim, wanted=need[1]), zeros(vocab, wanted=need[2])


def chunk_columns(n_rows: int, vocab: int, element_bytes: int, workspace_bytes: int) -> int:
    """Vocabulary columns per chunk of the deterministic backward: as many as ``workspace_bytes`` holds for
    ``n_rows`` positions, a multiple of CHUNK_ALIGN (every BLOCK_V divides it), at least CHUNK_ALIGN."""
    fits = workspace_bytes // max(1, n_rows * element_bytes)
    return min(max(CHUNK_ALIGN, fits // CHUNK_ALIGN * CHUNK_ALIGN), triton.cdiv(vocab, CHUNK_ALIGN) * CHUNK_ALIGN)


def _backward_chunked(prep: Prepared, heads: _Heads, rows: torch.Tensor, n_active: torch.Tensor, grads: tuple,
                      flags: dict, need: Tuple[bool, bool, bool]):
    """The deterministic backward: ``dz`` one vocabulary chunk at a time, then cuBLAS (module docstring)."""
    need_hidden, need_weight, need_bias = need
    (n, dim), vocab, device, f32 = heads.hidden.shape, prep.vocab_size, heads.hidden.device, torch.float32
    # The workspace takes the input dtype (eager's rounding of the logits gradient); under the interpreter
    # fp32, and the GEMMs read fp32 copies (the CPU matmul path of the tests).
    dz_dtype = f32 if interpreting() else heads.hidden.dtype
    width = chunk_columns(n, vocab, torch.finfo(dz_dtype).bits // 8, prep.options.workspace_bytes)
    workspace = torch.zeros(n, width, dtype=dz_dtype, device=device)  # rows without gradient stay 0
    hidden = heads.hidden if heads.hidden.dtype == dz_dtype else heads.hidden.to(dz_dtype)
    d_hidden = torch.zeros(n, dim, dtype=f32, device=device) if need_hidden else None
    w_dtype = f32 if heads.weight.dtype == f32 else heads.weight.dtype
    d_weight = torch.empty(vocab, dim, dtype=w_dtype, device=device) if need_weight else None
    d_bias = torch.empty(vocab, dtype=f32, device=device) if need_bias else None
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        dz = workspace[:, : v1 - v0]
        _launch(
            "dz", lambda meta, cols=v1 - v0: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(cols, meta["BLOCK_V"])),
            *heads.pointers(), prep.targets.contiguous(), rows, n_active, *grads, workspace,
            rows_bucket(n), vocab, dim, heads.ref_hidden.shape[1], v0, v1, prep.vocab_offset,
            *heads.strides(), workspace.stride(0), *heads.scalars, **flags,
        )
        weight_chunk = heads.weight[v0:v1]
        if need_hidden:
            d_hidden = _add_product(d_hidden, dz, weight_chunk if weight_chunk.dtype == dz_dtype
                                    else weight_chunk.to(dz_dtype))
        if need_weight:
            if d_weight.dtype == dz_dtype:
                torch.mm(dz.t(), hidden, out=d_weight[v0:v1])
            else:
                d_weight[v0:v1] = torch.mm(dz.t(), hidden)
        if need_bias:
            d_bias[v0:v1] = dz.sum(dim=0, dtype=f32)
    return d_hidden, d_weight, d_bias


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` into the fp32 accumulator ``acc``: in place for fp32 operands; for half operands on
    CUDA one cuBLAS GEMM with an fp32 output (``out_dtype``, fp32 accumulation, no rounding to half); the
    CPU has no such kernel (fp32 copies there)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if not a.is_cuda:
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    return torch.addmm(acc, a, b, out_dtype=acc.dtype)


def _backward_atomic(prep: Prepared, heads: _Heads, rows: torch.Tensor, n_active: torch.Tensor, grads: tuple,
                     flags: dict, need: Tuple[bool, bool, bool]):
    """``deterministic=False``: the fused kernel with relaxed fp32 atomics (``logprobs_bwd.py``)."""
    from ..kernels.logprobs_bwd import GROUP_N

    need_hidden, need_weight, need_bias = need
    (n, dim), vocab, device, f32 = heads.hidden.shape, prep.vocab_size, heads.hidden.device, torch.float32
    d_hidden = torch.zeros(n, dim, dtype=f32, device=device) if need_hidden else None
    d_weight = torch.zeros(vocab, dim, dtype=f32, device=device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=f32, device=device) if need_bias else None
    dummy = torch.zeros(1, dtype=f32, device=device)
    _launch(
        "bwd", lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),),
        *heads.pointers(), prep.targets.contiguous(), rows, n_active, *grads,
        dummy if d_hidden is None else d_hidden, dummy if d_weight is None else d_weight,
        dummy if d_bias is None else d_bias,
        n, rows_bucket(n), vocab, dim, heads.ref_hidden.shape[1], prep.vocab_offset,
        *heads.strides(), dim, dim, *heads.scalars,
        NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias, GROUP_N=GROUP_N, **flags,
    )
    return d_hidden, d_weight, d_bias
