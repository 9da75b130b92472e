"""Row-wise softmax passes over a dense logits buffer ``z [R, V]`` (fp32 or fp64), for the path that forms the
logits gradient in the forward:

- ``row_softmax_stats_kernel``: per row, ``lse = log sum_v exp(z[v])`` by an online max / sum-exp over BLOCK_V
  column blocks, and the target logit ``z[target]``;
- ``softmax_grad_kernel``: overwrites the row in place with ``row_scale * (onehot(target) - exp(z - lse))``, the
  gradient of ``row_scale * log_softmax(z)[target]`` with respect to ``z``.

One program per row. A row (up to 256k columns) is streamed once, contiguously, by a single program that keeps its
running max and sum in registers, so no partial states and no combine pass are needed; R (hundreds to thousands of
rows) gives enough programs to fill the GPU. Each block is read and, in the gradient pass, written by the program
that owns the row, so the in-place update needs no synchronisation. The row offset is formed in int64 since
``R * V`` can pass 2**31 (4096 rows x 256k columns).

Both kernels compute in the buffer's dtype (``logits_ptr``'s element type): fp32 for fp32, fp64 for fp64. The
launchers are in ``fastpref/backends/triton_rows.py``.
"""
import triton
import triton.language as tl

from .configs import ARCHS, config

# Memory-bound, with no tl.dot: a fixed configuration (no autotuning). BLOCK_N is 1 (one row per program); 8 warps
# over BLOCK_V columns give each thread 8 fp32 or 4 fp64 elements per block. Keyed by (architecture, dtype) for
# the launcher and for the ahead-of-time compile check (`fastpref kernels`, variants fp32_rows / fp64_rows).
ROWS_CONFIGS = {(arch, dtype): [config(1, block_v, None, num_warps=8, num_stages=1)]
                for arch in ARCHS for dtype, block_v in (("fp32", 2048), ("fp64", 1024))}


@triton.jit
def row_softmax_stats_kernel(logits_ptr, targets_ptr, row_lse_ptr, row_target_ptr, V, stride_row,
                             BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_row
    dtype = logits_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), dtype)  # running max of the row
    s = tl.zeros([], dtype)  # running sum of exp(z - m)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        # the tail block past V reads -inf, which adds exp(-inf) = 0 to the sum and never wins the max
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen is -inf (m_new = -inf), shift by 0 rather than by m_new: exp(-inf - -inf) would be
        # NaN, exp(-inf - 0) is the 0 wanted. An all -inf row then gets lse = -inf, as torch.logsumexp gives.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(dtype)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    tl.store(row_lse_ptr + row, m + tl.log(s))

    # Targets are not range-checked on the host (that would synchronise): an out-of-range target reads no memory
    # and yields a NaN target logit, so a loss built on it is visibly wrong rather than silently so.
    target = tl.load(targets_ptr + row)
    in_range = (target >= 0) & (target < V)
    target_logit = tl.load(z_row + target, mask=in_range, other=float("nan"))
    tl.store(row_target_ptr + row, target_logit)


@triton.jit
def softmax_grad_kernel(logits_ptr, targets_ptr, row_lse_ptr, row_scale_ptr, V, stride_row,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_row
    dtype = logits_ptr.dtype.element_ty
    lse = tl.load(row_lse_ptr + row)
    scale = tl.load(row_scale_ptr + row)
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V  # the tail block: columns past V are neither read nor written
        z = tl.load(z_row + offs, mask=mask, other=0.0)
        onehot = tl.where(offs == target, 1.0, 0.0).to(dtype)
        tl.store(z_row + offs, scale * (onehot - tl.exp(z - lse)), mask=mask)
