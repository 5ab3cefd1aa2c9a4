"""F2 of DESIGN.md: the spatial gates a_h (B, C, H) and a_w (B, C, W) from the pooled means.

One program per (sample, channel group, branch): a channel group of the four depthwise convs is
exactly a GroupNorm(4) group, so conv -> statistics -> normalise -> gate never leaves the
program. The inputs are tiny, so the conv is recomputed in each of the three sweeps over the
group (mean, centred variance, output) instead of being staged in memory."""
import triton
import triton.language as tl

from .utils import alloc, as_acc, launch, pow2, tile_elems, tl_dtype


@triton.jit
def _load_sum(p_ptr, n_parts, part_stride, row, pos, m, ACC: tl.constexpr):
    # p_ptr holds n_parts partial sums per element (the pool kernel's bands).
    v = tl.load(p_ptr + row + pos, mask=m, other=0.0).to(ACC)
    for k in range(1, n_parts):
        v += tl.load(p_ptr + k * part_stride + row + pos, mask=m, other=0.0).to(ACC)
    return v


@triton.jit
def _conv(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, cs,
          K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, G, ACC: tl.constexpr):
    cl = cs + tl.arange(0, BLOCK_G)  # channel inside the group: index into the conv weights
    li = tl.arange(0, BLOCK_L)  # position along the branch's length
    c_ok = cl < G
    row = (b.to(tl.int64) * C + c0 + cl)[:, None] * L
    z = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for t in range(K):  # a loop, not unrolled: 8 inlined group bodies x 9 taps would bloat the code
        pos = li[None, :] + (t - K // 2)
        m = c_ok[:, None] & (pos >= 0) & (pos < L)
        tap = tl.load(w_ptr + cl * K + t, mask=c_ok, other=0.0).to(ACC)
        z += tap[:, None] * _load_sum(p_ptr, n_parts, part_stride, row, pos, m, ACC)
    # The conv is linear: convolve the sums, then scale to means once (in ACC, not an fp32 scalar).
    inv_count = 1.0 / (tl.zeros([BLOCK_L], ACC) + count)
    bias = tl.load(bias_ptr + cl, mask=c_ok, other=0.0).to(ACC)
    return z * inv_count[None, :] + bias[:, None], c_ok[:, None] & (li < L)[None, :]


@triton.jit
def _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w_ptr, bias_ptr,
                b, grp, C, L, eps,
                K: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
                ACC: tl.constexpr):
    G = C // 4
    c0 = grp * G
    total = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for cs in range(0, G, BLOCK_G):
        z, m = _conv(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, cs,
                     K, BLOCK_G, BLOCK_L, G, ACC)
        total += tl.where(m, z, 0.0)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / (G * L)
    sq = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for cs in range(0, G, BLOCK_G):
        z, m = _conv(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, cs,
                     K, BLOCK_G, BLOCK_L, G, ACC)
        d = tl.where(m, z - mean, 0.0)
        sq += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / (G * L) + eps)
    for cs in range(0, G, BLOCK_G):
        z, m = _conv(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, cs,
                     K, BLOCK_G, BLOCK_L, G, ACC)
        c = c0 + cs + tl.arange(0, BLOCK_G)
        c_ok = c < c0 + G
        gw = tl.load(gn_w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        gb = tl.load(gn_b_ptr + c, mask=c_ok, other=0.0).to(ACC)
        z = (z - mean) * rstd * gw[:, None] + gb[:, None]
        if SOFTMAX:  # over the length axis, per channel
            z = tl.where(m, z, float("-inf"))
            e = tl.exp(z - tl.max(z, axis=1)[:, None])
            a = e / tl.sum(e, axis=1)[:, None]
        else:
            a = 1.0 / (1.0 + tl.exp(-z))
        li = tl.arange(0, BLOCK_L)
        tl.store(a_ptr + (b.to(tl.int64) * C + c)[:, None] * L + li[None, :], a, mask=m)


@triton.jit
def _gate_branch(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr,
                 w0, b0, w1, b1, w2, b2, w3, b3, b, grp, C, L, eps,
                 K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                 SOFTMAX: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # Kernel sizes differ per group, so each group gets its own unrolled tap loop.
    if grp == 0:
        _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w0, b0,
                    b, grp, C, L, eps, K0, SOFTMAX, BLOCK_G, BLOCK_L, ACC)
    elif grp == 1:
        _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w1, b1,
                    b, grp, C, L, eps, K1, SOFTMAX, BLOCK_G, BLOCK_L, ACC)
    elif grp == 2:
        _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w2, b2,
                    b, grp, C, L, eps, K2, SOFTMAX, BLOCK_G, BLOCK_L, ACC)
    else:
        _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w3, b3,
                    b, grp, C, L, eps, K3, SOFTMAX, BLOCK_G, BLOCK_L, ACC)


@triton.jit
def _spatial_gate_fwd_kernel(
    ph_ptr,  # (1, B, C, H) row sums
    pw_ptr,  # (NBANDS, B, C, W) banded column sums
    ah_ptr,  # (B, C, H) out
    aw_ptr,  # (B, C, W) out
    nh_w, nh_b, nw_w, nw_b,  # (C,) GroupNorm(4) affines of the H and W branches
    w0, b0, w1, b1, w2, b2, w3, b3,  # (G, 1, K_i) depthwise conv weights, (G,) biases
    B, C, H, W, nbands, eps: tl.float64,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    grp = tl.program_id(1)
    eps_acc = as_acc(eps, ACC)
    if tl.program_id(2) == 0:
        _gate_branch(ph_ptr, 1, 0, W, ah_ptr, nh_w, nh_b, w0, b0, w1, b1, w2, b2, w3, b3,
                     b, grp, C, H, eps_acc, K0, K1, K2, K3, SOFTMAX, BLOCK_G, BLOCK_H, ACC)
    else:
        _gate_branch(pw_ptr, nbands, B * C * W, H, aw_ptr, nw_w, nw_b, w0, b0, w1, b1, w2, b2,
                     w3, b3, b, grp, C, W, eps_acc, K0, K1, K2, K3, SOFTMAX, BLOCK_G, BLOCK_W, ACC)


def spatial_gate(ph, pw, conv_weights, conv_biases, norm_h, norm_w, kernel_sizes, softmax, eps):
    """Gates a_h (B, C, H), a_w (B, C, W) from the pool kernel's row / banded column sums."""
    nbands, B, C, W = pw.shape
    H = ph.shape[2]
    bh, bw = pow2(H), pow2(W)
    # A quarter of the usual tile: the taps keep up to nine shifted loads of it in flight (this
    # kernel reads kilobytes; occupancy does not matter here, spills would). Warp counts chosen
    # from ptxas reports of sm_80 and sm_90 (bench/aot_compile.py).
    bg = max(1, min(pow2(C // 4), tile_elems(ph.dtype) // (4 * max(bh, bw))))
    ah = alloc((B, C, H), ph.dtype, ph.device)
    aw = alloc((B, C, W), ph.dtype, ph.device)
    convs = [t for wb in zip(conv_weights, conv_biases) for t in wb]
    launch(_spatial_gate_fwd_kernel, (B, 4, 2),
        ph, pw, ah, aw, *norm_h, *norm_w, *convs, B, C, H, W, nbands, eps,
        K0=kernel_sizes[0], K1=kernel_sizes[1], K2=kernel_sizes[2], K3=kernel_sizes[3],
        SOFTMAX=softmax, BLOCK_G=bg, BLOCK_H=bh, BLOCK_W=bw, ACC=tl_dtype(ph.dtype),
        num_warps=8 if bg > 1 and bg * max(bh, bw) >= 512 else 4)
    return ah, aw
