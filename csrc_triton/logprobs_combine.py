"""Combine kernel of the split-vocabulary forward: merges the per-split partial states of each row.

For splits j with partial (m_j, s_j, t_j) the merged online log-sum-exp is m = max_j m_j,
s = sum_j s_j exp(m_j - m); target logits add (exactly one split holds the target column). The KL
accumulator is rescaled with the policy's maxima (forward KL) or the reference's (reverse KL), as
in the forward kernel. Then the same epilogue as the unsplit forward (per-position stores). The splits
are the forward's own or, under vocabulary parallelism, one per rank (all-gathered).
"""
import triton
import triton.language as tl

from .configs import ARCHS, PRECISIONS, config
from .tiles import online_lse_start, write_extras, write_row_results

# Elementwise over rows: one small configuration, no autotuning (the table form is for the AOT report).
COMBINE_CONFIG = config(128, None, None, num_warps=4, num_stages=1)
COMBINE_CONFIGS = {(arch, precision): [COMBINE_CONFIG] for arch in ARCHS for precision in PRECISIONS}


@triton.jit
def logprobs_combine_kernel(
    partials_ptr, rows_ptr, n_active_ptr,
    token_logps_ptr, lse_ptr, ref_token_logps_ptr, ref_lse_ptr, token_kl_ptr, extras_ptr,
    n_rows, n_splits,
    HAS_REF: tl.constexpr, KL_MODE: tl.constexpr, EXTRAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_active = tl.load(n_active_ptr)
    if tl.program_id(0) * BLOCK_N >= n_active:
        return
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_active
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    plane = n_splits * n_rows

    m, s, target_logit = online_lse_start(BLOCK_N)
    m_ref, s_ref, ref_target_logit = online_lse_start(BLOCK_N)
    kl_acc = tl.zeros((BLOCK_N,), tl.float32)
    pz, s2, sum_z = kl_acc, kl_acc, kl_acc
    for j in range(0, n_splits):
        part = partials_ptr + j * n_rows + offs
        m_j = tl.load(part, mask=row_mask, other=0.0)
        m_new = tl.maximum(m, m_j)
        rescale, rescale_j = tl.exp(m - m_new), tl.exp(m_j - m_new)
        s = s * rescale + tl.load(part + plane, mask=row_mask, other=0.0) * rescale_j
        target_logit += tl.load(part + 2 * plane, mask=row_mask, other=0.0)
        m = m_new
        if EXTRAS:  # the extras' partial sums, rescaled like s (s2 with the square of the factors)
            pz = pz * rescale + tl.load(part + 7 * plane, mask=row_mask, other=0.0) * rescale_j
            s2 = s2 * (rescale * rescale) + tl.load(part + 8 * plane, mask=row_mask, other=0.0) * (rescale_j * rescale_j)
            sum_z += tl.load(part + 9 * plane, mask=row_mask, other=0.0)
        if HAS_REF:
            m_ref_j = tl.load(part + 3 * plane, mask=row_mask, other=0.0)
            m_ref_new = tl.maximum(m_ref, m_ref_j)
            rescale_ref, rescale_ref_j = tl.exp(m_ref - m_ref_new), tl.exp(m_ref_j - m_ref_new)
            s_ref = s_ref * rescale_ref + tl.load(part + 4 * plane, mask=row_mask, other=0.0) * rescale_ref_j
            ref_target_logit += tl.load(part + 5 * plane, mask=row_mask, other=0.0)
            m_ref = m_ref_new
            kl_j = tl.load(part + 6 * plane, mask=row_mask, other=0.0)
            if KL_MODE == 1:
                kl_acc = kl_acc * rescale + kl_j * rescale_j
            if KL_MODE == 2:
                kl_acc = kl_acc * rescale_ref + kl_j * rescale_ref_j
    write_row_results(rows, row_mask, m, s, target_logit, m_ref, s_ref, ref_target_logit, kl_acc,
                      token_logps_ptr, lse_ptr, ref_token_logps_ptr, ref_lse_ptr, token_kl_ptr, HAS_REF, KL_MODE)
    if EXTRAS:
        write_extras(rows, row_mask, m, s, target_logit, pz, s2, sum_z, extras_ptr, n_rows)
