"""F3 of DESIGN.md: Y = avg_pool(X * a_h * a_w), without ever storing X * a_h * a_w.

A program owns BLOCK_C channels of one sample and one row of pooling windows; a row is seen as
a [BLOCK_J windows, BLOCK_K columns] tile (w = j * KW + t), so the window sums are plain
reductions over the last axis. a_w is constant down a column, so it is applied once after the
rows of a window are summed. Global pooling is the same kernel with one window of H x W."""
import triton
import triton.language as tl

from .utils import alloc, channel_block, launch, num_warps, sample_channels, tl_dtype, window_columns, window_tile


@triton.jit
def _gated_pool_fwd_kernel(
    x_ptr,  # (B, C, H, W), any strides
    ah_ptr,  # (B, C, H)
    aw_ptr,  # (B, C, W)
    y_ptr,  # (B, C, HO, WO) out, contiguous
    C, H, W, HO, WO, KH, KW,
    sxb, sxc, sxh, sxw,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    b, c = sample_channels(C, BLOCK_C)
    i = tl.program_id(1)
    j, t, w = window_columns(KW, BLOCK_J, BLOCK_K)
    c_ok = c < C
    m = c_ok[:, None, None] & ((j < WO)[:, None] & (t < KW)[None, :])[None, :, :]
    b64, c64 = b.to(tl.int64), c.to(tl.int64)
    plane = x_ptr + b64 * sxb + c64[:, None, None] * sxc + w.to(tl.int64)[None, :, :] * sxw
    acc = tl.zeros([BLOCK_C, BLOCK_J, BLOCK_K], ACC)
    for r in range(KH):
        h = i * KH + r
        a_h = tl.load(ah_ptr + (b64 * C + c64) * H + h, mask=c_ok, other=0.0)
        x = tl.load(plane + h.to(tl.int64) * sxh, mask=m, other=0.0).to(ACC)
        acc += x * a_h[:, None, None]
    a_w = tl.load(aw_ptr + (b64 * C + c64)[:, None, None] * W + w[None, :, :], mask=m, other=0.0)
    y = tl.sum(acc * a_w, axis=2) / (KH * KW)
    tl.store(y_ptr + ((b64 * C + c64)[:, None] * HO + i) * WO + j[None, :], y,
             mask=c_ok[:, None] & (j < WO)[None, :])


def gated_pool(x, ah, aw, window):
    """(B, C, H//KH, W//KW) window means of X * a_h * a_w, in a_h's dtype."""
    B, C, H, W = x.shape
    kh, kw = window
    ho, wo = H // kh, W // kw
    bj, bk = window_tile(wo * kw, kw)
    bc = channel_block(bj * bk, C, ah.dtype)
    y = alloc((B, C, ho, wo), ah.dtype, x.device)
    launch(_gated_pool_fwd_kernel, (B * triton.cdiv(C, bc), ho),
        x, ah, aw, y, C, H, W, ho, wo, kh, kw, *x.stride(),
        BLOCK_C=bc, BLOCK_J=bj, BLOCK_K=bk, ACC=tl_dtype(ah.dtype), num_warps=num_warps(bc * bj * bk, ah.dtype))
    return y
