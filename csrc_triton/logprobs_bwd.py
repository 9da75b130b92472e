"""Fused atomic backward kernel of ``fused_logprobs`` (the ``KernelOptions(deterministic=False)`` option).

One program per (BLOCK_N positions) x (BLOCK_V vocab) tile recomputes the logits gradient ``dz`` of its
tile (``tiles.dlogits_tile``) and immediately adds ``dz @ W_tile`` into dH, ``dz^T @ H`` into dW and
``sum(dz)`` into db, BLOCK_D columns at a time, with fp32 atomics. ``dz`` never exists beyond the tile:
no workspace, one kernel. The price is run-to-run nondeterminism in the last bits (fp32 summation
order), which is why the default backward is the chunked one (``logprobs_dz.py`` + cuBLAS).

The atomics are ``relaxed``: each is an independent reduction into memory that no program reads back,
so no ordering is needed; with the default ``acq_rel`` every atomic compiles to a GPU-wide fence, a
returning atomic and an L1 invalidate (``MEMBAR.ALL.GPU; ATOMG; CCTL.IVALL`` in the SASS), relaxed
ones to a plain ``RED``. The grid is one-dimensional and grouped (as in Triton's matmul tutorial):
GROUP_N row blocks share each vocabulary tile's turn, so programs running together reuse the same H/dH
rows and W/dW tiles in L2.

With ``FILTER_EPS > 0`` (``KernelOptions.grad_filter``) a tile whose entries are all small and that holds no
target (:func:`filter_tile`) returns before the D loop: the filter's work saving on the GPU (the deterministic
backward does not filter: its cuBLAS GEMMs span whole chunks, so zeroed tiles of ``dz`` would save nothing).

Rows are compacted on the device (``rows``: positions with a nonzero upstream gradient first, their
count at ``n_active_ptr``); programs past the count return at once.
"""
import triton
import triton.language as tl

from .configs import config, pruner, union
from .tiles import dlogits_tile

# Three live [BLOCK_N, BLOCK_V] fp32 tiles (z, r, dz) plus two dot accumulators. sm_90a tiles keep
# >= 64 rows on both dot outputs (dz @ W and dz^T @ H) for wgmma; exact fp32 ("ieee" FMA dot) uses
# smaller tiles, TF32 tensor-core tiles again.
BWD_CONFIGS = {
    ("sm_80", "half"): [
        config(64, 64, 32, num_warps=4, num_stages=3),
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_80", "fp32"): [
        config(64, 64, 32, num_warps=8, num_stages=2),
        config(32, 64, 16, num_warps=4, num_stages=2),
    ],
    ("sm_80", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
        config(64, 64, 16, num_warps=4, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=2),
    ],
    ("sm_90a", "half"): [
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(64, 128, 64, num_warps=8, num_stages=2),
        config(128, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_90a", "fp32"): [
        config(64, 64, 32, num_warps=8, num_stages=2),
        config(64, 32, 32, num_warps=8, num_stages=2),
    ],
    ("sm_90a", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=2),
        config(64, 128, 32, num_warps=8, num_stages=2),
    ],
}

# With ENTROPY (the entropy term of dz) the sm_80 bf16 4-warp and 128-row tiles and the 128-row/128-column TF32
# tiles spill (`fastpref kernels`, the `*_extras` variants): those are pruned, and sm_80 bf16 gets an 8-warp
# 64x64 tile with a 32-wide slice instead.
BWD_EXTRAS_CONFIGS = {
    **BWD_CONFIGS,
    ("sm_80", "half"): [
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_80", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
        config(64, 64, 16, num_warps=4, num_stages=3),
    ],
    ("sm_90a", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    # the 128-row tile spills 16 B here with the gradient filter's verdict compiled in (FILTER_EPS)
    ("sm_90a", "half"): [
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(64, 128, 64, num_warps=8, num_stages=2),
    ],
}

GROUP_N = 8  # row blocks per group of the grouped launch order
#: The gradient filter's threshold of the ahead-of-time compile (``fastpref kernels`` takes module constants
#: for the constexprs its variants leave unset): the filter's code is in every compiled variant, so the spill
#: and fence checks cover it. Launches pass their own (0.0: off).
FILTER_EPS = 2.0 ** -12

BWD_KEY = ["n_rows_bucket", "V", "D", "D_ref", "KL_MODE", "DOT_PRECISION", "REF_DOT_PRECISION", "ENTROPY",
           "FILTER_EPS"]


@triton.jit
def filter_tile(g, rows, row_mask, col0, targets_ptr, grad_logps_ptr, grad_kl_ptr, grad_entropy_ptr, vocab_offset,
                inv_temperature, FILTER_EPS: tl.constexpr, KL_MODE: tl.constexpr, ENTROPY: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """The gradient filter's verdict on a logits-gradient tile ``g`` (a scalar): skip it when no target lies in it
    and every entry is small, ``|g| <= FILTER_EPS * s / T`` with ``s`` the row's ``|a| + |b| + |c|`` (the upstream
    gradients that the launch's KL_MODE / ENTROPY give a gradient). A tile holding a target (columns
    ``[col0, col0 + BLOCK_V)``) is never skipped, so its one-hot term stays. Only row vectors are formed from
    ``g`` (its row maxima): a tile-sized mask or a second tile next to ``g`` made the kernel spill."""
    scale = tl.abs(tl.load(grad_logps_ptr + rows, mask=row_mask, other=0.0))
    if KL_MODE != 0:
        scale += tl.abs(tl.load(grad_kl_ptr + rows, mask=row_mask, other=0.0))
    if ENTROPY:
        scale += tl.abs(tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0))
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - vocab_offset
    has_target = (target >= col0) & (target < col0 + BLOCK_V)
    needed = (tl.max(tl.abs(g), axis=1) > (FILTER_EPS * inv_temperature) * scale) | has_target
    return tl.max(needed.to(tl.int32), axis=0) == 0


@triton.jit(do_not_specialize=["n_rows_bucket", "vocab_offset"])
def logprobs_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
    targets_ptr, rows_ptr, n_active_ptr, grad_logps_ptr, grad_kl_ptr, lse_ptr, ref_lse_ptr, token_kl_ptr,
    grad_entropy_ptr, entropy_ptr,
    d_hidden_ptr, d_weight_ptr, d_bias_ptr,
    n_rows, n_rows_bucket, V, D, D_ref, vocab_offset,
    stride_h, stride_w, stride_rh, stride_rw, stride_dh, stride_dw,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    KL_MODE: tl.constexpr,  # 0: no KL gradient, 1: forward KL(p||q), 2: reverse KL(q||p)
    ENTROPY: tl.constexpr,  # the entropy (an extra output) has a gradient
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,  # per head: each from its own dtype
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER_EPS: tl.constexpr,  # the gradient filter's threshold; 0.0: off
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped order: GROUP_N row blocks x every vocabulary tile, row block fastest within the group.
    pid = tl.program_id(0)
    row_blocks, col_blocks = tl.cdiv(n_rows, BLOCK_N), tl.cdiv(V, BLOCK_V)
    group = pid // (GROUP_N * col_blocks)
    first_row_block = group * GROUP_N
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_N)
    row_block = first_row_block + (pid % (GROUP_N * col_blocks)) % group_rows
    col_block = (pid % (GROUP_N * col_blocks)) // group_rows

    n_active = tl.load(n_active_ptr)
    if row_block * BLOCK_N >= n_active:
        return  # positions without gradient
    offs = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_active
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    cols = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V

    g = dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
                     targets_ptr, grad_logps_ptr, grad_kl_ptr, lse_ptr, ref_lse_ptr, token_kl_ptr,
                     grad_entropy_ptr, entropy_ptr, rows, row_mask, cols, col_mask, D, D_ref, vocab_offset,
                     stride_h, stride_w, stride_rh, stride_rw, inv_temperature, softcap,
                     HAS_BIAS, HAS_REF_BIAS, KL_MODE, ENTROPY, SOFTCAP, UPCAST, DOT_PRECISION, REF_DOT_PRECISION,
                     BLOCK_N, BLOCK_V, BLOCK_D)
    if FILTER_EPS > 0:
        if filter_tile(g, rows, row_mask, col_block * BLOCK_V, targets_ptr, grad_logps_ptr, grad_kl_ptr,
                       grad_entropy_ptr, vocab_offset, inv_temperature, FILTER_EPS, KL_MODE, ENTROPY, BLOCK_V):
            return  # a skipped tile: no GEMM, no atomics
    if NEED_DB:
        tl.atomic_add(d_bias_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
    if UPCAST:
        g_op = g
    else:
        # Half-precision dz feeds the tensor cores, as eager autograd's bf16 matmul does.
        g_op = g.to(hidden_ptr.dtype.element_ty)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_w
    dh_rows = d_hidden_ptr + rows.to(tl.int64)[:, None] * stride_dh
    dw_rows = d_weight_ptr + cols.to(tl.int64)[:, None] * stride_dw
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if NEED_DH:
            w = tl.load(w_rows + offs_d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(g_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_rows + offs_d[None, :], dh, mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
        if NEED_DW:
            h = tl.load(h_rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(g_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_rows + offs_d[None, :], dw, mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")


logprobs_bwd_autotuned = triton.autotune(
    configs=union(BWD_CONFIGS, BWD_EXTRAS_CONFIGS), key=BWD_KEY,
    prune_configs_by={"early_config_prune": pruner(BWD_CONFIGS, BWD_EXTRAS_CONFIGS, "ENTROPY")},
    # Every benchmark run accumulates into the gradients: zero them before each.
    reset_to_zero=["d_hidden_ptr", "d_weight_ptr", "d_bias_ptr"],
)(logprobs_bwd_kernel)
