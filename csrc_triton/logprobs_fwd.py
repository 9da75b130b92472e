"""Forward kernel of ``fused_logprobs``: one program per block of BLOCK_N positions (x vocabulary split).

The program walks its vocabulary range in BLOCK_V tiles. For each tile it forms the policy logits
``z = softcap((h @ W_tile^T + b) / T)`` (fp32 accumulation) and folds it into a running max ``m`` and
sum-exp ``s`` (online log-sum-exp), picking up the target logit when the target's column is in the
tile. With a reference it does the same for ``r`` (reference logits) in the same loop, plus the KL
accumulator:

- forward KL(p||q):  acc = sum_v exp(z - m) (z - r), rescaled with the policy's running max;
  KL = acc / s - lse + lse_r
- reverse KL(q||p):  acc = sum_v exp(r - m_r) (r - z), rescaled with the reference's running max;
  KL = acc / s_r - lse_r + lse

Without ``SPLIT`` the program covers the whole vocabulary and finishes the rows itself: per-position
results are written once, at their original position ``rows[i]`` (``write_row_results``). With ``SPLIT``
(few positions: too few row blocks to fill the GPU; or a vocabulary-parallel head, whose ranks each
contribute one split) axis 1 of the grid splits the vocabulary into ``split_v``-column ranges; each
program stores its partial (m, s, target logit, ..., acc) and ``logprobs_combine.py`` merges the splits
and runs the same epilogue.

Rows are compacted on the device: ``rows`` lists the valid positions first, and their count is read
from ``n_active_ptr``, so no host sync decides the grid. The grid covers every position; programs past
the count return at once, and the other positions keep their zeros.
"""
import triton
import triton.language as tl

from .configs import config, pruner, union
from .tiles import extra_sums_update, logits_tile, online_lse_start, write_extras, write_row_results

# sm_90a: 64/128-row tiles feed Hopper wgmma (one or two warpgroups); sm_80: mma.sync tiles with a
# 32-wide K slice so z, r and their exponentials fit the register file next to the pipeline.
# fp32 with the exact "ieee" FMA dot (operands in registers) needs smaller tiles on both; fp32 with
# TF32 (allow_tf32) uses tensor cores again with a 16/32-wide K slice. All spill-free (see
# `fastpref kernels`).
FWD_CONFIGS = {
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
        config(64, 128, 16, num_warps=8, num_stages=3),
        config(128, 64, 16, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_90a", "half"): [
        config(64, 64, 64, num_warps=4, num_stages=3),
        config(64, 128, 64, num_warps=8, num_stages=3),
        config(128, 64, 64, num_warps=8, num_stages=4),
    ],
    ("sm_90a", "fp32"): [
        config(64, 64, 32, num_warps=8, num_stages=2),
        config(32, 64, 32, num_warps=4, num_stages=2),
        config(64, 32, 32, num_warps=4, num_stages=2),
    ],
    ("sm_90a", "tf32"): [
        config(64, 64, 32, num_warps=4, num_stages=3),
        config(64, 128, 32, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=3),
    ],
}

# With EXTRAS the loop also carries the extras' sums (pz, s2, sum_z) and their [BLOCK_N, BLOCK_V] terms. Spilling
# there (`fastpref kernels`, the `*_extras` variants): the 4-warp 64x64 tiles with the default slice, sm_90a's
# 128-row bf16 tile (split form) and every exact fp32 tile; those columns get 8-warp, narrower or thinner-slice
# tiles instead (the other columns are the default's).
FWD_EXTRAS_CONFIGS = {
    **FWD_CONFIGS,
    ("sm_80", "half"): [
        config(64, 128, 32, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=8, num_stages=3),
    ],
    ("sm_80", "fp32"): [
        config(64, 32, 32, num_warps=8, num_stages=2),
        config(32, 32, 32, num_warps=4, num_stages=2),
    ],
    ("sm_90a", "half"): [
        config(64, 64, 64, num_warps=8, num_stages=3),
        config(64, 128, 64, num_warps=8, num_stages=3),
        config(64, 64, 32, num_warps=4, num_stages=3),
    ],
    ("sm_90a", "fp32"): [
        config(64, 32, 32, num_warps=8, num_stages=2),
        config(32, 64, 32, num_warps=8, num_stages=2),
        config(32, 32, 32, num_warps=4, num_stages=2),
    ],
    ("sm_90a", "tf32"): [
        config(64, 128, 32, num_warps=8, num_stages=3),
        config(128, 64, 32, num_warps=8, num_stages=3),
    ],
}

# n_rows_bucket: the number of positions rounded up to a power of two, so a config tuned on a short batch
# is not reused for a long one (the row count changes the grid, hence the best tile).
FWD_KEY = ["n_rows_bucket", "V", "D", "D_ref", "HAS_REF", "KL_MODE", "DOT_PRECISION", "REF_DOT_PRECISION", "SPLIT",
           "EXTRAS"]
# Fields of the partial state a SPLIT program stores, each an [n_splits, n_rows] plane.
# The fewest rows a forward program covers on a GPU (the launcher sizes its vocabulary split with it).
MIN_BLOCK_N = min(cfg.kwargs["BLOCK_N"] for cfg in union(FWD_CONFIGS, FWD_EXTRAS_CONFIGS))
PARTIAL_FIELDS = 7  # m, s, target logit, m_ref, s_ref, ref target logit, KL accumulator
EXTRA_FIELDS = 3  # with EXTRAS, planes 7-9: the extras' partial sums pz, s2, sum_z (tiles.extra_sums_update)


@triton.jit(do_not_specialize=["n_rows_bucket", "vocab_offset"])
def logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
    targets_ptr, rows_ptr, n_active_ptr,
    token_logps_ptr, lse_ptr, ref_token_logps_ptr, ref_lse_ptr, token_kl_ptr, partials_ptr, extras_ptr,
    n_rows, n_rows_bucket, V, D, D_ref, split_v, vocab_offset,
    stride_h, stride_w, stride_rh, stride_rw,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    KL_MODE: tl.constexpr,  # 0: none, 1: forward KL(p||q), 2: reverse KL(q||p)
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    EXTRAS: tl.constexpr,  # the extra outputs (entropy, mean logit, top-1, log sum p^2) into extras_ptr
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,  # per head: each from its own dtype
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_active = tl.load(n_active_ptr)
    if tl.program_id(0) * BLOCK_N >= n_active:
        return  # only ignored positions here: their outputs stay 0
    v_start = tl.program_id(1) * split_v
    v_end = tl.minimum(v_start + split_v, V)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_active
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    # Targets are global ids; this head's columns start at vocab_offset (vocabulary parallelism).
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - vocab_offset

    m, s, target_logit = online_lse_start(BLOCK_N)
    m_ref, s_ref, ref_target_logit = online_lse_start(BLOCK_N)
    kl_acc = tl.zeros((BLOCK_N,), tl.float32)
    pz, s2, sum_z = kl_acc, kl_acc, kl_acc

    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        # a target beyond this slice (vocabulary parallelism) may fall in the masked tail of the last tile
        is_target = (cols[None, :] == target[:, None]) & col_mask[None, :]
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D, stride_h,
                        stride_w, inv_temperature, softcap, HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_D)
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 in the masked columns (z = -inf there)
        s = s * rescale + tl.sum(e, axis=1)
        m = m_new
        if EXTRAS:
            pz, s2, sum_z = extra_sums_update(pz, s2, sum_z, z, e, rescale, col_mask)
        if HAS_REF:
            r = logits_tile(ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr, rows, row_mask, cols, col_mask,
                            D_ref, stride_rh, stride_rw, inv_temperature, softcap, HAS_REF_BIAS, SOFTCAP,
                            UPCAST, REF_DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            ref_target_logit += tl.sum(tl.where(is_target, r, 0.0), axis=1)
            m_ref_new = tl.maximum(m_ref, tl.max(r, axis=1))
            rescale_ref = tl.exp(m_ref - m_ref_new)
            e_ref = tl.exp(r - m_ref_new[:, None])
            s_ref = s_ref * rescale_ref + tl.sum(e_ref, axis=1)
            m_ref = m_ref_new
            # (z - r) is -inf - -inf = nan in the masked columns: zero them explicitly.
            if KL_MODE == 1:
                term = tl.where(col_mask[None, :], e * (z - r), 0.0)
                kl_acc = kl_acc * rescale + tl.sum(term, axis=1)
            if KL_MODE == 2:
                term = tl.where(col_mask[None, :], e_ref * (r - z), 0.0)
                kl_acc = kl_acc * rescale_ref + tl.sum(term, axis=1)

    if SPLIT:
        plane = tl.num_programs(1) * n_rows
        part = partials_ptr + tl.program_id(1) * n_rows + offs
        tl.store(part, m, mask=row_mask)
        tl.store(part + plane, s, mask=row_mask)
        tl.store(part + 2 * plane, target_logit, mask=row_mask)
        if HAS_REF:
            tl.store(part + 3 * plane, m_ref, mask=row_mask)
            tl.store(part + 4 * plane, s_ref, mask=row_mask)
            tl.store(part + 5 * plane, ref_target_logit, mask=row_mask)
            tl.store(part + 6 * plane, kl_acc, mask=row_mask)
        if EXTRAS:
            tl.store(part + 7 * plane, pz, mask=row_mask)
            tl.store(part + 8 * plane, s2, mask=row_mask)
            tl.store(part + 9 * plane, sum_z, mask=row_mask)
    else:
        write_row_results(rows, row_mask, m, s, target_logit, m_ref, s_ref, ref_target_logit, kl_acc,
                          token_logps_ptr, lse_ptr, ref_token_logps_ptr, ref_lse_ptr, token_kl_ptr, HAS_REF, KL_MODE)
        if EXTRAS:
            write_extras(rows, row_mask, m, s, target_logit, pz, s2, sum_z, extras_ptr, n_rows)


logprobs_fwd_autotuned = triton.autotune(
    configs=union(FWD_CONFIGS, FWD_EXTRAS_CONFIGS), key=FWD_KEY,
    prune_configs_by={"early_config_prune": pruner(FWD_CONFIGS, FWD_EXTRAS_CONFIGS, "EXTRAS")},
)(logprobs_fwd_kernel)
