"""F1-F3 of DESIGN.md in one launch for small maps: one program per (sample, channel group) pools
the group's channels, computes their gates and the pooled map Y of the gated input, with a CTA
barrier between the three (each reads what the one before wrote, in this program only).

A channel group is exactly what the spatial gate's GroupNorm(4) normalises over, so nothing
crosses programs; what the split gives up is the finer grids of the pool (a program per band) and
the gated pool (per window row). Where a group takes at most MAX_STEPS of those steps (ResNet-50
stages 3 and 4: the whole group in one tile, one or two bands) those grids had at most twice the
programs (4 or 8 a sample), and the forward is three launches instead of five. Larger maps keep
the separate passes, whose many programs a sample hide the latency of their rows' loads."""
import triton
import triton.language as tl

from . import spatial_gate
from .gated_pool import gated_pool_row
from .pool import ROWS, pool_band
from .spatial_gate import _gate_branch
from .utils import (
    aligned,
    alloc,
    as_acc,
    cdiv,
    channel_block,
    channel_vector,
    dense,
    launch,
    memo,
    options,
    row_tile,
    tl_dtype,
    vector_width,
    window_tile,
)

# Serial steps a program may take (channel blocks of its group x bands of ROWS rows) for a map to
# take this path; forward.py reads it on every call (the tests move it).
MAX_STEPS = 2


@triton.jit
def _group_channels(grp, G, cs, C, BLOCK_C: tl.constexpr, EVEN: tl.constexpr):
    # Channels cs ... cs + BLOCK_C - 1 of group grp; lanes past the group get C, which the pass
    # helpers mask (a channel of the next group there would race with that group's program). EVEN:
    # BLOCK_C divides G (the launcher checked), so there are none, and the channels are written so
    # that the compiler sees them contiguous from a multiple of BLOCK_C (channels_last: vector loads
    # along C, which the tl.where made 16-bit scalar ones).
    cl = cs + tl.arange(0, BLOCK_C)
    if EVEN:
        return grp * aligned(G, BLOCK_C) + cl
    return tl.where(cl < G, grp * G + cl, C)


@triton.jit
def _group_fwd_kernel(
    x_ptr,  # (B, C, H, W), any strides
    ph_ptr,  # (B, C, H) out: row sums
    pw_ptr,  # (NBANDS, B, C, W) out: column sums over each band of ROWS rows
    ah_ptr,  # (B, C, H) out
    aw_ptr,  # (B, C, W) out
    y_ptr,  # (B, C, HO, WO) out
    nh_w, nh_b, nw_w, nw_b,  # (C,) GroupNorm(4) affines of the H and W branches
    w0, b0, w1, b1, w2, b2, w3, b3,  # (G, 1, K_i) depthwise conv weights, (G,) biases
    B, C, H, W, HO, WO, KH, KW, nbands, eps: tl.float64,
    sxb, sxc, sxh, sxw,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    K2: tl.constexpr, K3: tl.constexpr, SOFTMAX: tl.constexpr, GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr, ACC: tl.constexpr,
):
    W, sxb, sxc, sxh = aligned(W, VEC), aligned(sxb, VEC), aligned(sxc, VEC), aligned(sxh, VEC)
    b = tl.program_id(0)
    grp = tl.program_id(1)
    G = C // 4
    for cs in range(0, G, BLOCK_C):  # F1
        c = _group_channels(grp, G, cs, C, BLOCK_C, EVEN)
        for band in range(nbands):
            pool_band(x_ptr, ph_ptr, pw_ptr, b, c, band, B, C, H, W, sxb, sxc, sxh, sxw, ROWS, BLOCK_W, ACC)
    tl.debug_barrier()
    eps_acc = as_acc(eps, ACC)  # F2
    _gate_branch(ph_ptr, 1, 0, W, ah_ptr, nh_w, nh_b, w0, b0, w1, b1, w2, b2, w3, b3,
                 b, grp, C, H, eps_acc, K0, K1, K2, K3, SOFTMAX, GROUP_FITS, BLOCK_G, BLOCK_H, ACC)
    _gate_branch(pw_ptr, nbands, B * C * W, H, aw_ptr, nw_w, nw_b, w0, b0, w1, b1, w2, b2, w3, b3,
                 b, grp, C, W, eps_acc, K0, K1, K2, K3, SOFTMAX, GROUP_FITS, BLOCK_G, BLOCK_W, ACC)
    tl.debug_barrier()
    for cs in range(0, G, BLOCK_C):  # F3
        c = _group_channels(grp, G, cs, C, BLOCK_C, EVEN)
        for i in range(HO):
            gated_pool_row(x_ptr, ah_ptr, aw_ptr, y_ptr, b, c, i, C, H, W, HO, WO, KH, KW, sxb, sxc, sxh, sxw,
                           BLOCK_W, BLOCK_J, BLOCK_K, ACC)


@memo
def _config(shape, strides, dtype, acc, kh, kw, kernel_sizes, softmax):
    """(serial steps a program takes, launch options, the allocations of p_h, p_w, a_h, a_w, Y)."""
    B, C, H, W = shape
    G = C // 4
    bj, bk = window_tile(W // kw * kw, kw)
    vec = vector_width((W,), dtype.itemsize, strides)
    # One tile for both the pool's rows and the gated pool's windows: the larger of the two.
    bc, warps = channel_block(row_tile(W, kw), G, acc, channel_vector(strides, dtype, vec))
    gate, (ah_spec, aw_spec) = spatial_gate._config(B, C, H, W, acc, kernel_sizes, softmax)
    nbands = cdiv(H, ROWS)
    gate_keys = ("K0", "K1", "K2", "K3", "SOFTMAX", "GROUP_FITS", "BLOCK_G", "BLOCK_H", "BLOCK_W")
    opts = options(ROWS=ROWS, BLOCK_C=bc, EVEN=G % bc == 0, **{k: gate[k] for k in gate_keys},
                   BLOCK_J=bj, BLOCK_K=bk, VEC=vec, ACC=tl_dtype(acc), num_warps=max(warps, gate["num_warps"]))
    specs = (dense(B, C, H), dense(nbands, B, C, W), ah_spec, aw_spec, dense(B, C, H // kh, W // kw))
    return cdiv(G, bc) * nbands, opts, specs


def plan(x, window, acc, kernel_sizes, softmax):
    """(launch options, allocations) of group_forward for the map x, or None where x takes the
    separate passes."""
    steps, opts, specs = _config(x.shape, x.stride(), x.dtype, acc, *window, kernel_sizes, softmax)
    return (opts, specs) if steps <= MAX_STEPS else None


def group_forward(x, acc, launch_plan, conv_weights, conv_biases, norm_h, norm_w, window, eps):
    """(p_h, p_w, a_h, a_w, Y) of pool, spatial_gate and gated_pool, in `acc` dtype, in one launch
    (launch_plan: from plan)."""
    B, C, H, W = x.shape
    kh, kw = window
    opts, specs = launch_plan
    ph, pw, ah, aw, y = [alloc(spec, acc, x.device) for spec in specs]
    w0, w1, w2, w3 = conv_weights
    b0, b1, b2, b3 = conv_biases
    launch(_group_fwd_kernel, (B, 4), opts, x, ph, pw, ah, aw, y, *norm_h, *norm_w, w0, b0, w1, b1, w2, b2, w3, b3,
           B, C, H, W, H // kh, W // kw, kh, kw, pw.shape[0], eps, *x.stride())
    return ph, pw, ah, aw, y
