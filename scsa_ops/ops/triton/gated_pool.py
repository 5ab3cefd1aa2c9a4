"""F3 of DESIGN.md: Y = avg_pool(X * a_h * a_w), without ever storing X * a_h * a_w.

A program owns BLOCK_C channels of one sample and one row of pooling windows: it sums its KH rows
of X * a_h as whole rows (contiguous, vector-wide loads), applies a_w (constant down a column)
once, and splits the sum into windows of KW columns at the end (utils.window_sums). Global
pooling is the same kernel with one window of H x W."""
import triton
import triton.language as tl

from .utils import (
    aligned,
    alloc,
    cdiv,
    channel_block,
    channel_vector,
    dense,
    launch,
    memo,
    options,
    pow2,
    row_tile,
    sample_channels,
    tl_dtype,
    vector_width,
    window_sums,
    window_tile,
)


@triton.jit
def gated_pool_row(x_ptr, ah_ptr, aw_ptr, y_ptr, b, c, i, C, H, W, HO, WO, KH, KW, sxb, sxc, sxh, sxw,
                   BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Y of channels c (those < C) of sample b in window row i."""
    w = tl.arange(0, BLOCK_W)
    c_ok = c < C
    m = c_ok[:, None] & (w < W)[None, :]
    b64, c64 = b.to(tl.int64), c.to(tl.int64)
    plane = x_ptr + b64 * sxb + c64[:, None] * sxc + w.to(tl.int64)[None, :] * sxw
    acc = tl.zeros([c.shape[0], BLOCK_W], ACC)
    # Unrolled by four: four rows' loads in flight at once (a rolled loop waits on each row's).
    for r in tl.range(KH, loop_unroll_factor=4):
        h = i * KH + r
        a_h = tl.load(ah_ptr + (b64 * C + c64) * H + h, mask=c_ok, other=0.0)
        x = tl.load(plane + h.to(tl.int64) * sxh, mask=m, other=0.0).to(ACC)
        acc += x * a_h[:, None]
    a_w = tl.load(aw_ptr + (b64 * C + c64)[:, None] * W + w[None, :], mask=m, other=0.0)
    y = window_sums(acc * a_w, KW, BLOCK_J, BLOCK_K) / (KH * KW)
    j = tl.arange(0, BLOCK_J)
    tl.store(y_ptr + ((b64 * C + c64)[:, None] * HO + i) * WO + j[None, :], y,
             mask=c_ok[:, None] & (j < WO)[None, :])


@triton.jit
def _gated_pool_fwd_kernel(
    x_ptr,  # (B, C, H, W), any strides
    ah_ptr,  # (B, C, H)
    aw_ptr,  # (B, C, W)
    y_ptr,  # (B, C, HO, WO) out, contiguous
    C, H, W, HO, WO, KH, KW,
    sxb, sxc, sxh, sxw,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr, ACC: tl.constexpr,
):
    W, sxb, sxc, sxh = aligned(W, VEC), aligned(sxb, VEC), aligned(sxc, VEC), aligned(sxh, VEC)
    b, c = sample_channels(C, BLOCK_C)
    gated_pool_row(x_ptr, ah_ptr, aw_ptr, y_ptr, b, c, tl.program_id(1), C, H, W, HO, WO, KH, KW, sxb, sxc, sxh,
                   sxw, BLOCK_W, BLOCK_J, BLOCK_K, ACC)


@memo
def _config(shape, strides, dtype, acc, kh, kw):
    """(grid, launch options, the output's allocation) of a gated_pool launch."""
    B, C, H, W = shape
    bj, bk = window_tile(W // kw * kw, kw)
    vec = vector_width((W,), dtype.itemsize, strides)
    bc, warps = channel_block(row_tile(W, kw), C, acc, channel_vector(strides, dtype, vec))
    return ((B * cdiv(C, bc), H // kh), options(BLOCK_C=bc, BLOCK_W=pow2(W), BLOCK_J=bj, BLOCK_K=bk, VEC=vec,
                                                ACC=tl_dtype(acc), num_warps=warps), dense(B, C, H // kh, W // kw))


def gated_pool(x, ah, aw, window):
    """(B, C, H//KH, W//KW) window means of X * a_h * a_w, in a_h's dtype."""
    B, C, H, W = x.shape
    kh, kw = window
    strides = x.stride()
    grid, opts, y_spec = _config(x.shape, strides, x.dtype, ah.dtype, kh, kw)
    y = alloc(y_spec, ah.dtype, x.device)
    launch(_gated_pool_fwd_kernel, grid, opts, x, ah, aw, y, C, H, W, H // kh, W // kw, kh, kw, *strides)
    return y
