"""F1 of DESIGN.md: row and column means of X in one read.

Each program owns BLOCK_C channels of one sample and a band of ROWS rows, whole rows wide: row
sums are complete in-program, column sums are per band and summed by the spatial-gate kernel
(deterministic, no atomics), which keeps enough programs in flight for small batches."""
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
    lt_block,
    memo,
    options,
    pow2,
    sample_channels,
    tl_dtype,
    vector_width,
)

ROWS = 8


@triton.jit
def pool_band(x_ptr, ph_ptr, pw_ptr, b, c, band, B, C, H, W, sxb, sxc, sxh, sxw,
              ROWS: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    """Row sums of channels c (those < C) of sample b in band `band` of ROWS rows, and the band's
    column sums."""
    w = tl.arange(0, BLOCK_W)
    c_ok, w_ok = c < C, w < W
    b64, c64, w64 = b.to(tl.int64), c.to(tl.int64), w.to(tl.int64)
    plane = x_ptr + b64 * sxb + c64[:, None] * sxc + w64[None, :] * sxw
    col = tl.zeros([c.shape[0], BLOCK_W], ACC)
    for r in tl.static_range(ROWS):
        h = band * ROWS + r
        row_ok = c_ok & lt_block(h, H, c)
        m = row_ok[:, None] & w_ok[None, :]
        x = tl.load(plane + h.to(tl.int64) * sxh, mask=m, other=0.0).to(ACC)
        tl.store(ph_ptr + (b64 * C + c64) * H + h, tl.sum(x, axis=1), mask=row_ok)
        col += x
    tl.store(pw_ptr + ((band * B + b64) * C + c64[:, None]) * W + w64[None, :], col,
             mask=c_ok[:, None] & w_ok[None, :])


@triton.jit
def _pool_fwd_kernel(
    x_ptr,  # (B, C, H, W), any strides
    ph_ptr,  # (B, C, H) row sums, contiguous
    pw_ptr,  # (NBANDS, B, C, W) column sums over each band of ROWS rows, contiguous
    B, C, H, W,
    sxb, sxc, sxh, sxw,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr,
):
    W, sxb, sxc, sxh = aligned(W, VEC), aligned(sxb, VEC), aligned(sxc, VEC), aligned(sxh, VEC)
    b, c = sample_channels(C, BLOCK_C)
    pool_band(x_ptr, ph_ptr, pw_ptr, b, c, tl.program_id(1), B, C, H, W, sxb, sxc, sxh, sxw, ROWS, BLOCK_W, ACC)


@memo
def _config(shape, strides, dtype, acc):
    """(grid, launch options, the outputs' allocations) of a pool launch: one dict lookup for a
    shape seen before."""
    B, C, H, W = shape
    bw = pow2(W)
    vec = vector_width((W,), dtype.itemsize, strides)
    bc, warps = channel_block(bw, C, acc, channel_vector(strides, dtype, vec))
    nbands = cdiv(H, ROWS)  # a program per band of ROWS rows
    return ((B * cdiv(C, bc), nbands), options(ROWS=ROWS, BLOCK_C=bc, BLOCK_W=bw, VEC=vec, ACC=tl_dtype(acc),
                                               num_warps=warps), (dense(B, C, H), dense(nbands, B, C, W)))


def pool(x, acc):
    """Row sums (B, C, H) and banded column sums (NBANDS, B, C, W), in `acc` dtype."""
    B, C, H, W = x.shape
    strides = x.stride()
    grid, opts, (ph_spec, pw_spec) = _config(x.shape, strides, x.dtype, acc)
    ph, pw = alloc(ph_spec, acc, x.device), alloc(pw_spec, acc, x.device)
    launch(_pool_fwd_kernel, grid, opts, x, ph, pw, B, C, H, W, *strides)
    return ph, pw
