"""F2 of DESIGN.md: the spatial gates a_h (B, C, H) and a_w (B, C, W) from the pooled means.

One program per (sample, channel group, branch): a channel group of the four depthwise convs is
exactly a GroupNorm(4) group, so conv -> statistics -> normalise -> gate never leaves the
program. The inputs are tiny, so the conv is recomputed in each of the three sweeps over the
group (mean, centred variance, output) instead of being staged in memory. The backward
(DESIGN.md 3.2) has the same programs: gate, GroupNorm(4) and conv differentiated by hand."""
import torch
import triton
import triton.language as tl

from .apply_gates import _channel_gate
from .utils import alloc, as_acc, cdiv, dense, launch, memo, options, pow2, tile_elems, tl_dtype


@triton.jit
def _sums(p_ptr, n_parts, part_stride, row, li, m, ACC: tl.constexpr):
    # The sums at rows `row`, positions li: p_ptr holds n_parts partial sums an element (the pool
    # kernel's bands), read four at a step so that their loads are in flight together.
    off = row + li[None, :]
    v = tl.load(p_ptr + off, mask=m, other=0.0).to(ACC)
    for k in range(1, n_parts, 4):
        for u in tl.static_range(4):
            part_ok = m & ((tl.zeros_like(li) + (k + u)) < n_parts)[None, :]
            v += tl.load(p_ptr + (k + u) * part_stride + off, mask=part_ok, other=0.0).to(ACC)
    return v


@triton.jit
def _tap(p, p_ptr, n_parts, part_stride, row, m, d, L, ACC: tl.constexpr):
    # The sums p (at rows `row` of p_ptr) shifted by d along the length, p[:, l + d], 0 where l + d is
    # outside [0, L): a tap of the zero-padded conv. Rows of up to 64 regroup p in registers (a
    # gather: a few warp shuffles) instead of waiting on a reload a tap; past that a gather's
    # shuffles grow with the row (ptxas spilled at 512), and the tap is reloaded.
    src = tl.arange(0, p.shape[1]) + d
    ok = (src >= 0) & (src < L)
    if p.shape[1] <= 64:
        idx = tl.broadcast_to(tl.where(ok, src, 0)[None, :], p.shape)
        return tl.where(ok[None, :], tl.gather(p, idx, 1), 0.0)
    return _sums(p_ptr, n_parts, part_stride, row, src, m & ok[None, :], ACC)


@triton.jit
def _block(p_ptr, n_parts, part_stride, b, C, L, c0, cs, G, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
           ACC: tl.constexpr):
    # (channels cl inside the group, their mask, the tile's mask, its rows' offsets, the sums p
    # [BLOCK_G, BLOCK_L]) of the group's channels cs ... cs + BLOCK_G - 1
    cl = cs + tl.arange(0, BLOCK_G)  # channel inside the group: index into the conv weights
    li = tl.arange(0, BLOCK_L)  # position along the branch's length
    c_ok = cl < G
    m = c_ok[:, None] & (li < L)[None, :]
    row = (b.to(tl.int64) * C + c0 + cl)[:, None] * L
    return cl, c_ok, m, row, _sums(p_ptr, n_parts, part_stride, row, li, m, ACC)


@triton.jit
def _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC: tl.constexpr):
    # The group's depthwise conv of the sums p, as means: the conv is linear, so the sums are
    # convolved and scaled once (in ACC, not an fp32 scalar).
    z = tl.zeros_like(p)
    for t in range(K):  # a loop, not unrolled: K is the group's, known at run time
        tap = tl.load(w_ptr + cl * K + t, mask=c_ok, other=0.0).to(ACC)
        z += tap[:, None] * _tap(p, p_ptr, n_parts, part_stride, row, m, t - K // 2, L, ACC)
    inv_count = 1.0 / (tl.zeros([p.shape[1]], ACC) + count)
    bias = tl.load(bias_ptr + cl, mask=c_ok, other=0.0).to(ACC)
    return z * inv_count[None, :] + bias[:, None]


@triton.jit
def _moments(z, m, n, eps):
    # GroupNorm statistics (mean, rstd) of the n values of z under m, centred in registers
    mean = tl.sum(tl.sum(tl.where(m, z, 0.0), axis=1), axis=0) / n
    d = tl.where(m, z - mean, 0.0)
    return mean, _overflow_is_nan(1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / n + eps))


@triton.jit
def _overflow_is_nan(rstd):
    # rstd is 0 only where the squares of finite deviations overflowed (past ~1e19): gates from it
    # would be wrong with no NaN to show it. NaN instead, so the output is NaN; the C++ path sums
    # those squares again in fp64 and is right there (csrc/scsa.h overflow_safe_sum_sq), but a
    # second sweep here spilled a bf16 channel-attention kernel.
    return tl.where(rstd == 0, float("nan"), rstd)


@triton.jit
def _group_stats(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, eps,
                 K, GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
                 ACC: tl.constexpr):
    # GroupNorm(4) statistics (mean, rstd) of the conv output of the group at channel c0: from one
    # tile when the group fits one (GROUP_FITS), else in two sweeps, the conv recomputed in each.
    G = C // 4
    if GROUP_FITS:
        cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, 0, G, BLOCK_G, BLOCK_L, ACC)
        z = _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC)
        return _moments(z, m, G * L, eps)
    total = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for cs in range(0, G, BLOCK_G):
        cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, cs, G, BLOCK_G, BLOCK_L, ACC)
        z = _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC)
        total += tl.where(m, z, 0.0)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / (G * L)
    sq = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for cs in range(0, G, BLOCK_G):
        cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, cs, G, BLOCK_G, BLOCK_L, ACC)
        z = _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC)
        d = tl.where(m, z - mean, 0.0)
        sq += d * d
    return mean, _overflow_is_nan(1.0 / tl.sqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / (G * L) + eps))


@triton.jit
def _store_gate(z, m, mean, rstd, a_ptr, gn_w_ptr, gn_b_ptr, b, C, L, c, c_ok, SOFTMAX: tl.constexpr,
                ACC: tl.constexpr):
    gw = tl.load(gn_w_ptr + c, mask=c_ok, other=0.0).to(ACC)
    gb = tl.load(gn_b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    z = (z - mean) * rstd * gw[:, None] + gb[:, None]
    if SOFTMAX:  # over the length axis, per channel
        z = tl.where(m, z, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        a = e / tl.sum(e, axis=1)[:, None]
    else:
        a = 1.0 / (1.0 + tl.exp(-z))
    li = tl.arange(0, z.shape[1])
    tl.store(a_ptr + (b.to(tl.int64) * C + c)[:, None] * L + li[None, :], a, mask=m)


@triton.jit
def _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w_ptr, bias_ptr,
                b, grp, C, L, eps,
                K, SOFTMAX: tl.constexpr, GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    G = C // 4
    c0 = grp * G
    if GROUP_FITS:  # the sums read once, the conv computed once
        cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, 0, G, BLOCK_G, BLOCK_L, ACC)
        z = _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC)
        mean, rstd = _moments(z, m, G * L, eps)
        _store_gate(z, m, mean, rstd, a_ptr, gn_w_ptr, gn_b_ptr, b, C, L, c0 + cl, c_ok, SOFTMAX, ACC)
    else:
        mean, rstd = _group_stats(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, eps,
                                  K, GROUP_FITS, BLOCK_G, BLOCK_L, ACC)
        for cs in range(0, G, BLOCK_G):
            cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, cs, G, BLOCK_G, BLOCK_L, ACC)
            z = _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC)
            _store_gate(z, m, mean, rstd, a_ptr, gn_w_ptr, gn_b_ptr, b, C, L, c0 + cl, c_ok, SOFTMAX, ACC)


@triton.jit
def _of_group(grp, v0, v1, v2, v3):
    # Group grp's value of the four (one per channel group), chosen at run time.
    return tl.where(grp == 0, v0, tl.where(grp == 1, v1, tl.where(grp == 2, v2, v3)))


@triton.jit
def _group_conv(grp, w0, b0, w1, b1, w2, b2, w3, b3, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                K3: tl.constexpr):
    # Group grp's depthwise conv (weights, bias, kernel size, the taps of the groups before it),
    # picked at run time: one inlined group body instead of four. Eight inlined copies (four groups,
    # two branches) made the backward's compile several times slower for no fewer registers.
    return (_of_group(grp, w0, w1, w2, w3), _of_group(grp, b0, b1, b2, b3), _of_group(grp, K0, K1, K2, K3),
            _of_group(grp, 0, K0, K0 + K1, K0 + K1 + K2))


@triton.jit
def _gate_branch(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr,
                 w0, b0, w1, b1, w2, b2, w3, b3, b, grp, C, L, eps,
                 K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                 SOFTMAX: tl.constexpr, GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
                 ACC: tl.constexpr):
    w, bias, k, _ = _group_conv(grp, w0, b0, w1, b1, w2, b2, w3, b3, K0, K1, K2, K3)
    _gate_group(p_ptr, n_parts, part_stride, count, a_ptr, gn_w_ptr, gn_b_ptr, w, bias,
                b, grp, C, L, eps, k, SOFTMAX, GROUP_FITS, BLOCK_G, BLOCK_L, ACC)


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
    GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    grp = tl.program_id(1)
    eps_acc = as_acc(eps, ACC)
    if tl.program_id(2) == 0:
        _gate_branch(ph_ptr, 1, 0, W, ah_ptr, nh_w, nh_b, w0, b0, w1, b1, w2, b2, w3, b3,
                     b, grp, C, H, eps_acc, K0, K1, K2, K3, SOFTMAX, GROUP_FITS, BLOCK_G, BLOCK_H, ACC)
    else:
        _gate_branch(pw_ptr, nbands, B * C * W, H, aw_ptr, nw_w, nw_b, w0, b0, w1, b1, w2, b2,
                     w3, b3, b, grp, C, W, eps_acc, K0, K1, K2, K3, SOFTMAX, GROUP_FITS, BLOCK_G, BLOCK_W, ACC)


@triton.jit
def _gate_input(r_ptr, s_ptr, u_ptr, v_ptr, dy_ptr, ac, bc, m, li, H, W, HO, WO, HC, KH, KW,
                BRANCH_W: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # dL/da_h (dL/da_w) of channels bc = b * C + c at positions li from gate_grads' sums: the direct
    # part a_c R (a_c sum_i S) and the pooled part through dL/dY, U (V) times dY over each window.
    pooled = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    if BRANCH_W:
        direct = tl.zeros([BLOCK_G, BLOCK_L], ACC)
        for i in range(HC):
            direct += tl.load(s_ptr + (bc[:, None] * HC + i) * W + li[None, :], mask=m, other=0.0)
        covered = m & (li < WO * KW)[None, :]
        for i in range(HO):
            v = tl.load(v_ptr + (bc[:, None] * HO + i) * (WO * KW) + li[None, :], mask=covered, other=0.0)
            pooled += v * tl.load(dy_ptr + (bc[:, None] * HO + i) * WO + (li // KW)[None, :], mask=covered, other=0.0)
    else:
        direct = tl.load(r_ptr + bc[:, None] * H + li[None, :], mask=m, other=0.0)
        covered = m & (li < HO * KH)[None, :]
        for j in range(WO):
            u = tl.load(u_ptr + (bc[:, None] * (HO * KH) + li[None, :]) * WO + j, mask=covered, other=0.0)
            pooled += u * tl.load(dy_ptr + (bc[:, None] * HO + (li // KH)[None, :]) * WO + j, mask=covered, other=0.0)
    return ac[:, None] * direct + pooled


@triton.jit
def _group_bwd(p_ptr, n_parts, part_stride, count, a_ptr, dz_ptr, dsum_ptr, gn_w_ptr, w_ptr, bias_ptr, o_ptr,
               r_ptr, s_ptr, u_ptr, v_ptr, dy_ptr, part_b, cw_at, cb_at, nrm_at, b, grp, C, L, H, W, HO, WO, HC, KH,
               KW, eps, K, pad_taps, BRANCH_W: tl.constexpr, SOFTMAX: tl.constexpr,
               GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_CS: tl.constexpr,
               ACC: tl.constexpr):
    # One group of one branch (DESIGN.md 3.2): gate, GroupNorm(4), conv. dz_ptr (B, C, L) holds
    # dL/dzhat, then dL/dz, between the sweeps; dsum_ptr gets dL/d(sums) = dL/d(means) / count.
    G = C // 4
    c0 = grp * G
    b64 = b.to(tl.int64)
    mean, rstd = _group_stats(p_ptr, n_parts, part_stride, count, w_ptr, bias_ptr, b, C, L, c0, eps,
                              K, GROUP_FITS, BLOCK_G, BLOCK_L, ACC)
    li = tl.arange(0, BLOCK_L)
    s1 = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    s2 = tl.zeros([BLOCK_G, BLOCK_L], ACC)
    for cs in range(0, G, BLOCK_G):
        cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, cs, G, BLOCK_G, BLOCK_L, ACC)
        z = _conv(p, p_ptr, n_parts, part_stride, row, m, cl, c_ok, count, w_ptr, bias_ptr, L, K, ACC)
        c = c0 + cl
        off = (b64 * C + c)[:, None] * L + li[None, :]
        zhat = tl.where(m, (z - mean) * rstd, 0.0)
        a = tl.load(a_ptr + off, mask=m, other=0.0)
        ac = _channel_gate(o_ptr, b64, c, c_ok, C, SOFTMAX, BLOCK_CS, ACC)
        da = tl.where(m, _gate_input(r_ptr, s_ptr, u_ptr, v_ptr, dy_ptr, ac, b64 * C + c, m, li, H, W, HO, WO, HC,
                                     KH, KW, BRANCH_W, BLOCK_G, BLOCK_L, ACC), 0.0)
        if SOFTMAX:  # over the length
            dzn = a * (da - tl.sum(da * a, axis=1)[:, None])
        else:
            dzn = da * a * (1.0 - a)
        dzn = tl.where(m, dzn, 0.0)
        tl.store(part_b + nrm_at + c, tl.sum(dzn * zhat, axis=1), mask=c_ok)
        tl.store(part_b + nrm_at + C + c, tl.sum(dzn, axis=1), mask=c_ok)
        dzh = tl.load(gn_w_ptr + c, mask=c_ok, other=0.0).to(ACC)[:, None] * dzn
        s1 += dzh
        s2 += dzh * zhat
        tl.store(dz_ptr + off, dzh, mask=m)
        tl.store(dsum_ptr + off, zhat, mask=m)  # kept for the next sweep; overwritten by dsum at the end
    m1 = tl.sum(tl.sum(s1, axis=1), axis=0) / (G * L)
    m2 = tl.sum(tl.sum(s2, axis=1), axis=0) / (G * L)
    tl.debug_barrier()
    for cs in range(0, G, BLOCK_G):
        c = c0 + cs + tl.arange(0, BLOCK_G)
        m = (c < c0 + G)[:, None] & (li < L)[None, :]
        off = (b64 * C + c)[:, None] * L + li[None, :]
        zhat = tl.load(dsum_ptr + off, mask=m, other=0.0)
        dzh = tl.load(dz_ptr + off, mask=m, other=0.0)
        tl.store(dz_ptr + off, rstd * (dzh - m1 - zhat * m2), mask=m)
    tl.debug_barrier()
    for cs in range(0, G, BLOCK_G):
        cl, c_ok, m, row, p = _block(p_ptr, n_parts, part_stride, b, C, L, c0, cs, G, BLOCK_G, BLOCK_L, ACC)
        dz = tl.load(dz_ptr + row + li[None, :], mask=m, other=0.0)
        tl.store(part_b + cb_at + cl, tl.sum(dz, axis=1), mask=c_ok)
        dp = tl.zeros([BLOCK_G, BLOCK_L], ACC)
        for t in range(K):
            mean_t = _tap(p, p_ptr, n_parts, part_stride, row, m, t - K // 2, L, ACC) / count
            # pad_taps: the zero padding is summed too (NaN x 0 is NaN), as in the eager conv
            pos = li + (t - K // 2)
            contrib = tl.where(m & (((pos >= 0) & (pos < L)) | pad_taps)[None, :], dz * mean_t, 0.0)
            tl.store(part_b + cw_at + cl * K + t, tl.sum(contrib, axis=1), mask=c_ok)
            w_t = tl.load(w_ptr + cl * K + t, mask=c_ok, other=0.0).to(ACC)
            dp += w_t[:, None] * _tap(dz, dz_ptr, 1, 0, row, m, K // 2 - t, L, ACC)
        tl.store(dsum_ptr + row + li[None, :], dp / count, mask=m)


@triton.jit
def _branch_bwd(p_ptr, n_parts, part_stride, count, a_ptr, dz_ptr, dsum_ptr, gn_w_ptr, w0, b0, w1, b1, w2, b2, w3,
                b3, o_ptr, r_ptr, s_ptr, u_ptr, v_ptr, dy_ptr, part_b, conv_at, nrm_at, b, grp, C, L, H, W, HO, WO, HC,
                KH, KW, eps, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                PAD0: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr, PAD3: tl.constexpr,
                BRANCH_W: tl.constexpr, SOFTMAX: tl.constexpr, GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_CS: tl.constexpr, ACC: tl.constexpr):
    # conv_at: this branch's conv partials, the four groups' weights, then their biases.
    G = C // 4
    w, bias, k, taps_before = _group_conv(grp, w0, b0, w1, b1, w2, b2, w3, b3, K0, K1, K2, K3)
    pad_taps = _of_group(grp, PAD0, PAD1, PAD2, PAD3)
    _group_bwd(p_ptr, n_parts, part_stride, count, a_ptr, dz_ptr, dsum_ptr, gn_w_ptr, w, bias, o_ptr, r_ptr, s_ptr,
               u_ptr, v_ptr, dy_ptr, part_b, conv_at + G * taps_before, conv_at + G * (K0 + K1 + K2 + K3 + grp), nrm_at,
               b, grp, C, L, H, W, HO, WO, HC, KH, KW, eps, k, pad_taps, BRANCH_W, SOFTMAX, GROUP_FITS, BLOCK_G,
               BLOCK_L, BLOCK_CS, ACC)


@triton.jit
def _spatial_gate_bwd_kernel(
    ph_ptr, pw_ptr,  # the forward's sums: (1, B, C, H) rows, (NBANDS, B, C, W) banded columns
    ah_ptr, aw_ptr,  # (B, C, H), (B, C, W) the gates
    o_ptr,  # (B, C) channel-attention logits
    r_ptr, s_ptr, u_ptr, v_ptr,  # gate_grads' sums
    dy_ptr,  # (B, C, HO, WO) dL/dY / (KH KW)
    dzh_ptr, dzw_ptr,  # (B, C, H), (B, C, W) workspaces
    dph_ptr, dpw_ptr,  # out: (B, C, H) dL/dp_h / W, (B, C, W) dL/dp_w / H
    part_ptr,  # (B, P) out: per-sample parameter gradients; conv (H branch, then W branch), norm_h, norm_w
    nh_w, nw_w,  # (C,) GroupNorm(4) weights of the H and W branches
    w0, b0, w1, b1, w2, b2, w3, b3,  # (G, 1, K_i) depthwise conv weights, (G,) biases
    B, C, H, W, HO, WO, HC, KH, KW, nbands, P, eps: tl.float64,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    PAD0: tl.constexpr, PAD1: tl.constexpr, PAD2: tl.constexpr, PAD3: tl.constexpr, SOFTMAX: tl.constexpr,
    GROUP_FITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_CS: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (sample, channel group, branch), as in the forward.
    b = tl.program_id(0)
    grp = tl.program_id(1)
    eps_acc = as_acc(eps, ACC)
    part_b = part_ptr + b.to(tl.int64) * P
    conv_size = (C // 4) * (K0 + K1 + K2 + K3 + 4)  # one branch's conv partials
    if tl.program_id(2) == 0:
        _branch_bwd(ph_ptr, 1, 0, W, ah_ptr, dzh_ptr, dph_ptr, nh_w, w0, b0, w1, b1, w2, b2, w3, b3, o_ptr, r_ptr,
                    s_ptr, u_ptr, v_ptr, dy_ptr, part_b, 0, 2 * conv_size, b, grp, C, H, H, W, HO, WO, HC, KH, KW,
                    eps_acc, K0, K1, K2, K3, PAD0, PAD1, PAD2, PAD3, False, SOFTMAX, GROUP_FITS, BLOCK_G, BLOCK_H,
                    BLOCK_CS, ACC)
    else:
        _branch_bwd(pw_ptr, nbands, B * C * W, H, aw_ptr, dzw_ptr, dpw_ptr, nw_w, w0, b0, w1, b1, w2, b2, w3, b3,
                    o_ptr, r_ptr, s_ptr, u_ptr, v_ptr, dy_ptr, part_b, conv_size, 2 * conv_size + 2 * C, b, grp, C, W,
                    H, W, HO, WO, HC, KH, KW, eps_acc, K0, K1, K2, K3, PAD0, PAD1, PAD2, PAD3, True, SOFTMAX,
                    GROUP_FITS, BLOCK_G, BLOCK_W, BLOCK_CS, ACC)


def _group_options(C, H, W, acc, kernel_sizes, softmax, tile_share):
    """Launch options both spatial-gate kernels take (grid (B, 4, 2)): a group's channels BLOCK_G
    at a time, in 1 / tile_share of a plane kernel's tile."""
    bh, bw = pow2(H), pow2(W)
    bg = max(1, min(pow2(C // 4), tile_elems(acc) // (tile_share * max(bh, bw))))
    return dict(K0=kernel_sizes[0], K1=kernel_sizes[1], K2=kernel_sizes[2], K3=kernel_sizes[3], SOFTMAX=softmax,
                GROUP_FITS=bg >= C // 4, BLOCK_G=bg, BLOCK_H=bh, BLOCK_W=bw, ACC=tl_dtype(acc),
                num_warps=8 if bg > 1 and bg * max(bh, bw) >= 512 else 4)


@memo
def _config(B, C, H, W, acc, kernel_sizes, softmax):
    """(launch options, the allocations of a_h and a_w)."""
    # A plane kernel's tile: a ResNet group (C / 4 channels of rows up to 64) in one, so its sums
    # are read once and its conv computed once (the taps are gathers in registers: three tiles
    # live). Warp counts chosen from ptxas reports of sm_80 and sm_90 (bench/aot_compile.py).
    return options(**_group_options(C, H, W, acc, kernel_sizes, softmax, 1)), (dense(B, C, H), dense(B, C, W))


def spatial_gate(ph, pw, conv_weights, conv_biases, norm_h, norm_w, kernel_sizes, softmax, eps):
    """Gates a_h (B, C, H), a_w (B, C, W) from the pool kernel's row / banded column sums."""
    nbands, B, C, W = pw.shape
    H = ph.shape[2]
    opts, (ah_spec, aw_spec) = _config(B, C, H, W, ph.dtype, kernel_sizes, softmax)
    ah, aw = alloc(ah_spec, ph.dtype, ph.device), alloc(aw_spec, ph.dtype, ph.device)
    w0, w1, w2, w3 = conv_weights
    b0, b1, b2, b3 = conv_biases
    launch(_spatial_gate_fwd_kernel, (B, 4, 2), opts, ph, pw, ah, aw, *norm_h, *norm_w, w0, b0, w1, b1, w2, b2, w3,
           b3, B, C, H, W, nbands, eps)
    return ah, aw


def padded_taps(k, dtype):
    """Whether the eager conv1d's weight gradient sums the zero padding too (torch on CPU: all but its
    kernel-3 depthwise path for fp32 and bf16). It decides only where NaN and Inf land."""
    return not (k == 3 and dtype in (torch.float32, torch.bfloat16))


@memo
def _backward_config(B, C, H, W, acc, kernel_sizes, x_dtype, softmax):
    """(launch options, the allocations of dz_h and dL/dp_h, dz_w and dL/dp_w)."""
    # As the forward's, but a quarter of the tile for rows of 128 and more (ptxas, sm_90: a 50 x 84
    # map spilled under the 128-register budget at half).
    group = _group_options(C, H, W, acc, kernel_sizes, softmax, 4 if max(pow2(H), pow2(W)) >= 128 else 2)
    pads = [padded_taps(k, x_dtype) for k in kernel_sizes]
    opts = options(**group, PAD0=pads[0], PAD1=pads[1], PAD2=pads[2], PAD3=pads[3], BLOCK_CS=min(1024, pow2(C)))
    return opts, (dense(B, C, H), dense(B, C, W))


def spatial_gate_backward(ph, pw, ah, aw, o, sums, dy, conv_weights, norm_h_weight, norm_w_weight, conv_biases,
                          window, softmax, eps, part, x_dtype):
    """(dL/dp_h / W, dL/dp_w / H) from dL/dY and gate_grads' sums; fills the conv (one set per
    branch), norm_h and norm_w partials of `part`."""
    nbands, B, C, W = pw.shape
    H = ph.shape[2]
    kh, kw = window
    acc = ph.dtype
    opts, (h_spec, w_spec) = _backward_config(B, C, H, W, acc, tuple([w.shape[-1] for w in conv_weights]), x_dtype,
                                              softmax)
    dzh, dzw = alloc(h_spec, acc, ph.device), alloc(w_spec, acc, ph.device)
    dph, dpw = alloc(h_spec, acc, ph.device), alloc(w_spec, acc, ph.device)
    w0, w1, w2, w3 = conv_weights
    b0, b1, b2, b3 = conv_biases
    launch(_spatial_gate_bwd_kernel, (B, 4, 2), opts,
        ph, pw, ah, aw, o, *sums, dy, dzh, dzw, dph, dpw, part, norm_h_weight, norm_w_weight,
        w0, b0, w1, b1, w2, b2, w3, b3, B, C, H, W, H // kh, W // kw, cdiv(H, kh), kh, kw, nbands, part.shape[1], eps)
    return dph, dpw
