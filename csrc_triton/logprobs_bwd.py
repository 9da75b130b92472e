"""Backward kernel of ``fused_logprobs``: one program per (BLOCK_N positions) x (BLOCK_V vocab) tile.

Each program recomputes its logits tile ``z`` (and the reference tile ``r`` when the KL has an
upstream gradient) from the forward's saved per-position log-sum-exps, forms the logits gradient

    dz = a (onehot - p) + b dKL/dz,   a = dL/dtoken_logps, b = dL/dtoken_kl,
    forward KL(p||q):  dKL/dz = p ((z - r) - (lse - lse_r + KL))
    reverse KL(q||p):  dKL/dz = p - q

times the softcap and temperature chain rule (``1 - (z/c)^2`` and ``1/T``), and immediately adds
``dz @ W_tile`` into dH, ``dz^T @ H`` into dW and ``sum(dz)`` into db, BLOCK_D columns at a time.
``dz`` never exists beyond the [BLOCK_N, BLOCK_V] tile.

Why one kernel with fp32 atomics rather than two atomic-free kernels (one per position block that
loops over the vocabulary for dH, one per vocabulary block that loops over positions for dW): the
logits recompute is a third of the backward's FLOPs and the two-kernel split does it twice (+33%
work, +100% with a reference tile), while the atomics go to L2 and overlap with the tensor-core
work. The price is run-to-run nondeterminism of dH/dW/db in the last bits (fp32 summation order).

Positions whose upstream gradients are all zero (ignored positions, sequences with zero loss
weight such as MC-PO's unselected candidates) are skipped before launch: the host passes only the
active rows (``rows``), so no tile of inactive positions is ever scheduled.
"""
import triton
import triton.language as tl

from .configs import config, pruner, union
from .tiles import logits_tile

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
        config(64, 32, 32, num_warps=4, num_stages=2),
    ],
    ("sm_90a", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=2),
        config(64, 128, 32, num_warps=8, num_stages=2),
    ],
}

BWD_KEY = ["V", "D", "D_ref", "KL_MODE", "DOT_PRECISION", "REF_DOT_PRECISION"]


@triton.jit
def logprobs_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
    targets_ptr, rows_ptr, grad_logps_ptr, grad_kl_ptr, lse_ptr, ref_lse_ptr, token_kl_ptr,
    d_hidden_ptr, d_weight_ptr, d_bias_ptr,
    n_rows, V, D, D_ref,
    stride_h, stride_w, stride_rh, stride_rw, stride_dh, stride_dw,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    KL_MODE: tl.constexpr,  # 0: no KL gradient, 1: forward KL(p||q), 2: reverse KL(q||p)
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,  # per head: each from its own dtype
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Axis 0 (fastest in launch order) walks position blocks, so concurrently running programs
    # share one W tile in L2.
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_rows
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V

    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    a = tl.load(grad_logps_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D, stride_h,
                    stride_w, inv_temperature, softcap, HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION,
                    BLOCK_N, BLOCK_V, BLOCK_D)
    p = tl.exp(z - lse[:, None])
    if KL_MODE == 0:
        g = -a[:, None] * p
    else:
        b = tl.load(grad_kl_ptr + rows, mask=row_mask, other=0.0)
        lse_ref = tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)
        r = logits_tile(ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr, rows, row_mask, cols, col_mask,
                        D_ref, stride_rh, stride_rw, inv_temperature, softcap, HAS_REF_BIAS, SOFTCAP,
                        UPCAST, REF_DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        if KL_MODE == 1:
            kl = tl.load(token_kl_ptr + rows, mask=row_mask, other=0.0)
            shift = lse - lse_ref + kl
            g = p * (b[:, None] * ((z - r) - shift[:, None]) - a[:, None])
        else:
            q = tl.exp(r - lse_ref[:, None])
            g = (b - a)[:, None] * p - b[:, None] * q
    g += tl.where(cols[None, :] == target[:, None], a[:, None], 0.0)
    if SOFTCAP:
        # d(c tanh(u / c))/du = 1 - (z / c)^2 with z the capped logit.
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = g * inv_temperature
    # Masked columns carry nan (-inf - -inf) and padding rows garbage: zero both before any sum.
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)

    if NEED_DB:
        tl.atomic_add(d_bias_ptr + cols, tl.sum(g, axis=0), mask=col_mask)
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
            tl.atomic_add(dh_rows + offs_d[None, :], dh, mask=row_mask[:, None] & d_mask[None, :])
        if NEED_DW:
            h = tl.load(h_rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(g_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_rows + offs_d[None, :], dw, mask=col_mask[:, None] & d_mask[None, :])


logprobs_bwd_autotuned = triton.autotune(
    configs=union(BWD_CONFIGS), key=BWD_KEY,
    prune_configs_by={"early_config_prune": pruner(BWD_CONFIGS)},
    # Every benchmark run accumulates into the gradients: zero them before each.
    reset_to_zero=["d_hidden_ptr", "d_weight_ptr", "d_bias_ptr"],
)(logprobs_bwd_kernel)
