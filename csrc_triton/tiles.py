"""The logits tile shared by the forward and backward kernels."""
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
