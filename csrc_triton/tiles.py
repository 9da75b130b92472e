"""Pieces shared by the kernels: the logits tile, the forward's per-position epilogue and the logits gradient."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|): never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
                inv_temperature, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[i, j] = softcap(((H[rows[i]] . W[cols[j]]) + b[cols[j]]) / T), fp32; -inf where cols >= V.

    The projection is a K-loop over D in BLOCK_D slices with fp32 accumulation; bf16/fp16 slices
    feed ``tl.dot`` directly (tensor cores). ``UPCAST`` converts them to fp32 first: the Triton
    interpreter's bf16 dot is wrong, so the CPU interpreter path sets it.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temperature
    if SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def online_lse_start(BLOCK_N: tl.constexpr):
    """(running max, sum-exp, target logit) of a row block before any tile: (-inf, 0, 0)."""
    return (tl.full((BLOCK_N,), float("-inf"), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32))


@triton.jit
def extra_sums_update(pz, s2, sum_z, z, e, rescale, col_mask):
    """Fold one logits tile into the extras' partial sums (``EXTRAS``): ``pz = sum exp(z - m) z`` and
    ``s2 = sum exp(2 (z - m))``, rescaled with the running max ``m`` like the sum-exp, and ``sum_z = sum z``.
    ``e = exp(z - m_new)`` is 0 in the masked columns; z (-inf there) is zeroed before the products."""
    z0 = tl.where(col_mask[None, :], z, 0.0)
    return (pz * rescale + tl.sum(e * z0, axis=1), s2 * (rescale * rescale) + tl.sum(e * e, axis=1),
            sum_z + tl.sum(z0, axis=1))


@triton.jit
def write_extras(rows, row_mask, m, s, target_logit, pz, s2, sum_z, extras_ptr, n_rows):
    """Store the extras of a row block into the ``[4, n_rows]`` planes at ``extras_ptr``: entropy
    ``lse - pz / s``, the logits' sum (the launcher divides by V), target-is-top-1 (``target_logit >= m``:
    both read the same tiles, so a tie compares equal values) and ``log sum p^2 = log s2 - 2 log s``."""
    log_s = tl.log(s)
    tl.store(extras_ptr + rows, (m + log_s) - pz / s, mask=row_mask)
    tl.store(extras_ptr + n_rows + rows, sum_z, mask=row_mask)
    tl.store(extras_ptr + 2 * n_rows + rows, tl.where(target_logit >= m, 1.0, 0.0), mask=row_mask)
    tl.store(extras_ptr + 3 * n_rows + rows, tl.log(s2) - 2.0 * log_s, mask=row_mask)


@triton.jit
def write_row_results(rows, row_mask, m, s, target_logit, m_ref, s_ref, ref_target_logit, kl_acc,
                      token_logps_ptr, lse_ptr, ref_token_logps_ptr, ref_lse_ptr, token_kl_ptr,
                      HAS_REF: tl.constexpr, KL_MODE: tl.constexpr):
    """Finish the online log-sum-exp of a row block and store the per-position results at positions ``rows``.

    lse = m + log s; token log-prob = target logit - lse; the KL accumulator ``kl_acc`` is
    sum_v exp(z - m)(z - r) (forward) or sum_v exp(r - m_ref)(r - z) (reverse), so
    KL(p||q) = kl_acc / s - (lse - lse_ref) and KL(q||p) = kl_acc / s_ref + (lse - lse_ref).
    Per-sequence sums are left to the op (a deterministic reduction, not atomics).
    """
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(token_logps_ptr + rows, target_logit - lse, mask=row_mask)
    if HAS_REF:
        lse_ref = m_ref + tl.log(s_ref)
        tl.store(ref_lse_ptr + rows, lse_ref, mask=row_mask)
        tl.store(ref_token_logps_ptr + rows, ref_target_logit - lse_ref, mask=row_mask)
        if KL_MODE != 0:
            # lse - lse_ref as (m - m_ref) + log(s / s_ref): the log of a ratio near 1, not the difference
            # of two O(log V) logs whose round-off would dominate a small KL.
            lse_diff = (m - m_ref) + tl.log(s / s_ref)
            if KL_MODE == 1:
                token_kl = kl_acc / s - lse_diff
            else:
                token_kl = kl_acc / s_ref + lse_diff
            tl.store(token_kl_ptr + rows, token_kl, mask=row_mask)


@triton.jit
def dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr,
                 targets_ptr, grad_logps_ptr, grad_kl_ptr, lse_ptr, ref_lse_ptr, token_kl_ptr,
                 grad_entropy_ptr, entropy_ptr,
                 rows, row_mask, cols, col_mask, D, D_ref, vocab_offset,
                 stride_h, stride_w, stride_rh, stride_rw, inv_temperature, softcap,
                 HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, KL_MODE: tl.constexpr,
                 ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The logits gradient of a [BLOCK_N, BLOCK_V] tile, fp32, 0 outside ``row_mask`` x ``col_mask``.

    The logits ``z`` (and the reference's ``r`` when the KL has a gradient) are recomputed and the
    softmax taken from the forward's saved log-sum-exps:

        dz = a (onehot - p) + b dKL/dz,   a = dL/dtoken_logps, b = dL/dtoken_kl,
        forward KL(p||q):  dKL/dz = p ((z - r) - (lse - lse_r + KL))
        reverse KL(q||p):  dKL/dz = p - q

    plus, with ``ENTROPY`` (the entropy has a gradient ``c = dL/dH``), ``-c p (z - lse + H)``

    times the softcap and temperature chain rule (``1 - (z/c)^2`` and ``1/T``). ``cols`` index this
    head's (possibly vocabulary-parallel) slice; targets are global ids, hence ``vocab_offset``.
    """
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - vocab_offset
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
    if ENTROPY:
        c = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
        shift_h = lse - tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        g -= (c[:, None] * p) * (z - shift_h[:, None])
    g += tl.where(cols[None, :] == target[:, None], a[:, None], 0.0)
    if SOFTCAP:
        # d(c tanh(u / c))/du = 1 - (z / c)^2 with z the capped logit.
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = g * inv_temperature
    # Masked columns carry nan (-inf - -inf) and padding rows garbage: zero both before any use.
    return tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
