"""Logits-gradient kernel of the deterministic backward: writes one vocabulary chunk of ``dz``.

One program per (BLOCK_N positions) x (BLOCK_V columns) tile of the chunk ``[v_start, v_end)``:
``dlogits_tile`` recomputes the logits (and the reference logits when the KL has a gradient) from the
forward's saved log-sum-exps and forms ``dz``; the tile is stored, rounded to the workspace's dtype
(the input dtype for bf16/fp16, as eager autograd rounds the logits gradient; fp32 otherwise), at
``dz[position, column - v_start]``. The launcher then hands the chunk to cuBLAS:
``dH += dz @ W[chunk]`` (fp32 accumulator) and ``dW[chunk] = dz^T @ H``: no atomics, the same bits
every run.

Rows are compacted on the device (``rows`` lists the positions with a nonzero upstream gradient
first, ``n_active_ptr`` holds their count): programs past the count return at once, and those
positions' rows of the workspace keep the zeros the launcher filled it with.
"""
import triton
import triton.language as tl

from .configs import config, pruner, union
from .tiles import dlogits_tile

# z, r, p (q) and dz tiles live at once, more than in the forward: on sm_90a only 8-warp tiles are spill-free
# (`fastpref kernels` checks every one); they keep >= 64 rows for wgmma.
DZ_CONFIGS = {
    ("sm_80", "half"): [
        config(64, 128, 32, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=4, num_stages=4),
    ],
    ("sm_80", "fp32"): [
        config(64, 64, 32, num_warps=8, num_stages=2),
        config(32, 64, 32, num_warps=4, num_stages=2),
    ],
    ("sm_80", "tf32"): [
        config(128, 64, 16, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_90a", "half"): [
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(64, 128, 64, num_warps=8, num_stages=3),
    ],
    ("sm_90a", "fp32"): [
        config(64, 64, 32, num_warps=8, num_stages=2),
        config(32, 64, 32, num_warps=8, num_stages=2),
    ],
    ("sm_90a", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
        config(64, 128, 32, num_warps=8, num_stages=3),
    ],
}

# With ENTROPY the tile also forms the entropy term -c p (z - lse + H): the 4-warp tiles and the 128-column ones
# spill there (`fastpref kernels`, the `*_extras` variants), so those columns are pruned or get an 8-warp tile.
DZ_EXTRAS_CONFIGS = {
    **DZ_CONFIGS,
    ("sm_80", "half"): [
        config(128, 64, 32, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_80", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_90a", "half"): [
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(64, 128, 32, num_warps=8, num_stages=3),
    ],
    ("sm_90a", "tf32"): [
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
}

DZ_KEY = ["n_rows_bucket", "V", "D", "D_ref", "KL_MODE", "DOT_PRECISION", "REF_DOT_PRECISION", "ENTROPY"]


@triton.jit(do_not_specialize=["n_rows_bucket", "v_start", "v_end", "vocab_offset"])
def logprobs_dz_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
    targets_ptr, rows_ptr, n_active_ptr, grad_logps_ptr, grad_kl_ptr, lse_ptr, ref_lse_ptr, token_kl_ptr,
    grad_entropy_ptr, entropy_ptr,
    dz_ptr,
    n_rows_bucket, V, D, D_ref, v_start, v_end, vocab_offset,
    stride_h, stride_w, stride_rh, stride_rw, stride_dz,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    KL_MODE: tl.constexpr,  # 0: no KL gradient, 1: forward KL(p||q), 2: reverse KL(q||p)
    ENTROPY: tl.constexpr,  # the entropy (an extra output) has a gradient
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,  # per head: each from its own dtype
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_active = tl.load(n_active_ptr)
    if tl.program_id(0) * BLOCK_N >= n_active:
        return  # positions without gradient: their workspace rows stay 0
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_active
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    cols = v_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_end

    g = dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
                     targets_ptr, grad_logps_ptr, grad_kl_ptr, lse_ptr, ref_lse_ptr, token_kl_ptr,
                     grad_entropy_ptr, entropy_ptr, rows, row_mask, cols, col_mask, D, D_ref, vocab_offset,
                     stride_h, stride_w, stride_rh, stride_rw, inv_temperature, softcap,
                     HAS_BIAS, HAS_REF_BIAS, KL_MODE, ENTROPY, SOFTCAP, UPCAST, DOT_PRECISION, REF_DOT_PRECISION,
                     BLOCK_N, BLOCK_V, BLOCK_D)
    dz = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + (cols - v_start)[None, :]
    tl.store(dz, g.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


logprobs_dz_autotuned = triton.autotune(
    configs=union(DZ_CONFIGS, DZ_EXTRAS_CONFIGS), key=DZ_KEY,
    prune_configs_by={"early_config_prune": pruner(DZ_CONFIGS, DZ_EXTRAS_CONFIGS, "ENTROPY")},
)(logprobs_dz_kernel)
