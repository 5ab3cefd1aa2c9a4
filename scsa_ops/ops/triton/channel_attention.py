"""F4 of DESIGN.md: channel-attention logits o (B, C) from the pooled map Y (B, C, N).

Flash-attention style over key channels: a program owns BLOCK_I query channels of one head of one
sample and streams key channels in blocks of BLOCK_J with a running max, so the D x D matrix never
exists. GroupNorm(1) and the q/k/v depthwise 1x1 convs are folded into one per-channel affine
(Q = alpha_q * Y + beta_q), so no normalised copy of Y is made; and mean_n(P V) = P @ mean_n(V)
means only the key-block row sums of Y are needed for V. The gate itself is applied by the
apply_gates kernel, because a softmax gate spans all channels of a sample."""
import torch
import triton
import triton.language as tl

from .apply_gates import _channel_gate
from .utils import alloc, as_acc, cdiv, dense, launch, lt_block, memo, options, pow2, tl_dtype

# Elements of Y per step of the GroupNorm(1) statistics sweep (the whole sample, C * N values).
STATS_BLOCK = 1024


@triton.jit
def group_norm_stats(y_b, M, eps, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """GroupNorm(1) statistics (mu, rstd) of one sample's M values, shifted by its first element for
    a stable one-pass variance; every program of the sample recomputes them (Y is 1/49 of X,
    usually cached)."""
    shift = tl.load(y_b).to(ACC)
    s1 = tl.zeros([BLOCK_S], ACC)
    s2 = tl.zeros([BLOCK_S], ACC)
    for k0 in range(0, M, BLOCK_S):
        k = k0 + tl.arange(0, BLOCK_S)
        d = tl.where(k < M, tl.load(y_b + k, mask=k < M, other=0.0).to(ACC) - shift, 0.0)
        s1 += d
        s2 += d * d
    mean_d, sum_sq = tl.sum(s1, axis=0) / M, tl.sum(s2, axis=0)
    rstd = 1.0 / tl.sqrt(tl.maximum(sum_sq / M - mean_d * mean_d, 0.0) + as_acc(eps, ACC))
    # Squares past the fp32 limit (finite values past ~1e19, or an Inf): NaN, not a wrong number
    # (spatial_gate._overflow_is_nan).
    return shift + mean_d, tl.where(sum_sq == float("inf"), float("nan"), rstd)


@triton.jit
def _affine(w_ptr, bias_ptr, gn_w_ptr, gn_b_ptr, c, c_ok, mu, rstd, HAS_BIAS: tl.constexpr,
            ACC: tl.constexpr):
    # w * ((y - mu) * rstd * gn_w + gn_b) + bias  ==  alpha * y + beta
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
    gw = tl.load(gn_w_ptr + c, mask=c_ok, other=0.0).to(ACC)
    gb = tl.load(gn_b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    alpha = w * gw * rstd
    beta = w * (gb - gw * rstd * mu)
    if HAS_BIAS:
        beta += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(ACC)
    return alpha, beta


@triton.jit
def _tile(y_b, c, c_ok, alpha, beta, n, n_ok, N, ACC: tl.constexpr):
    # Q (or K) at channels c and positions n: alpha * y + beta, 0 outside the tile
    m = c_ok[:, None] & n_ok[None, :]
    y = tl.load(y_b + c[:, None] * N + n[None, :], mask=m, other=0.0).to(ACC)
    return tl.where(m, alpha[:, None] * y + beta[:, None], 0.0), y


@triton.jit
def _scores(y_b, ci, i_ok, aq, bq_, cj, j_ok, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N, inv_sqrt_d,
            HAS_BIAS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
            ACC: tl.constexpr):
    # S = Q K^T / sqrt(D) of query channels ci and key channels cj (-inf at keys past the head), and
    # vbar of the keys.
    ak, bk_ = _affine(wk, bk, gn_w, gn_b, cj, j_ok, mu, rstd, HAS_BIAS, ACC)
    av, bv_ = _affine(wv, bv, gn_w, gn_b, cj, j_ok, mu, rstd, HAS_BIAS, ACC)
    s = tl.zeros([BLOCK_I, BLOCK_J], ACC)
    ysum = tl.zeros([BLOCK_J], ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        q, _ = _tile(y_b, ci, i_ok, aq, bq_, n, n < N, N, ACC)
        k, yk = _tile(y_b, cj, j_ok, ak, bk_, n, n < N, N, ACC)
        s += tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC)
        ysum += tl.sum(yk, axis=1)
    return tl.where(j_ok[None, :], s * inv_sqrt_d[None, :], float("-inf")), av * (ysum / N) + bv_


@triton.jit
def _softmax_rows(y_b, ci, i_ok, aq, bq_, head, D, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N, inv_sqrt_d,
                  HAS_BIAS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                  ACC: tl.constexpr):
    # Query rows ci against every key of the head, streamed in blocks of BLOCK_J with a running max:
    # (max m, sum of exp(S - m), sum of exp(S - m) vbar); o = the last / the middle.
    m_i = tl.full([BLOCK_I], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_I], ACC)
    acc = tl.zeros([BLOCK_I], ACC)
    for j0 in range(0, D, BLOCK_J):
        kj = j0 + tl.arange(0, BLOCK_J)
        s, vbar = _scores(y_b, ci, i_ok, aq, bq_, head * D + kj, kj < D, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N,
                          inv_sqrt_d, HAS_BIAS, BLOCK_I, BLOCK_J, BLOCK_N, ACC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr + tl.sum(p * vbar[None, :], axis=1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _channel_attention_fwd_kernel(
    y_ptr,  # (B, C, N) pooled map, contiguous
    o_ptr,  # (B, C) out: pre-gate logits
    gn_w, gn_b,  # (C,) GroupNorm(1) affine
    wq, wk, wv,  # (C,) depthwise 1x1 conv weights
    bq, bk, bv,  # (C,) their biases (ignored unless HAS_BIAS)
    C, N, D, eps: tl.float64,
    HAS_BIAS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    y_b = y_ptr + b.to(tl.int64) * C * N
    mu, rstd = group_norm_stats(y_b, C * N, eps, BLOCK_S, ACC)

    qi = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    ci = head * D + qi
    i_ok = qi < D
    aq, bq_ = _affine(wq, bq, gn_w, gn_b, ci, i_ok, mu, rstd, HAS_BIAS, ACC)
    inv_sqrt_d = 1.0 / tl.sqrt(tl.zeros([BLOCK_J], ACC) + D)  # in ACC: an fp32 scalar arg would cap fp64 runs
    m_i, l_i, acc = _softmax_rows(y_b, ci, i_ok, aq, bq_, head, D, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N,
                                  inv_sqrt_d, HAS_BIAS, BLOCK_I, BLOCK_J, BLOCK_N, ACC)
    tl.store(o_ptr + b.to(tl.int64) * C + ci, acc / l_i, mask=i_ok)


@memo
def _config(B, C, N, dtype, head_num, has_bias):
    """(grid, launch options, the output's allocation) of a channel_attention launch."""
    D = C // head_num
    # tl.dot needs >= 16 per side; 32 keeps three fp32 32x32 tiles (q, k, scores) in registers, with
    # 8 warps: at 4, the variant a 7x7 map under a 7x7 window compiles (N = 1, a constant in the
    # JIT's specialisation) spilled on sm_90. num_stages=1: Y is small and cached, and the software
    # pipeline's extra buffers of the N loop took a detection map (N = 1316) to 144 registers.
    side = 32 if dtype == torch.float32 else 16
    bi = min(side, max(16, pow2(D)))
    bn = 16 if N <= 16 else side  # = min(side, max(16, pow2(N))), one comparison for compile guards
    return (B, head_num, cdiv(D, bi)), options(HAS_BIAS=has_bias, BLOCK_I=bi, BLOCK_J=bi, BLOCK_N=bn,
                                               BLOCK_S=STATS_BLOCK, ACC=tl_dtype(dtype),
                                               num_warps=8 if side == 32 else 4, num_stages=1), dense(B, C)


def channel_attention(y, norm, qkv_weights, qkv_biases, head_num, eps):
    """Logits o (B, C) of DESIGN.md step 10, in y's dtype."""
    B, C, HO, WO = y.shape
    has_bias = qkv_biases[0] is not None
    grid, opts, o_spec = _config(B, C, HO * WO, y.dtype, head_num, has_bias)
    o = alloc(o_spec, y.dtype, y.device)
    biases = qkv_biases if has_bias else qkv_weights  # placeholders, never read
    launch(_channel_attention_fwd_kernel, grid, opts, y, o, *norm, *qkv_weights, *biases, C, HO * WO, C // head_num,
           eps)
    return o


@triton.jit
def _logit_grad(o_ptr, r_ptr, ah_ptr, b64, c, c_ok, C, H, dot, SOFTMAX: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_CS: tl.constexpr, ACC: tl.constexpr):
    # (dL/do, dL/da_c) of channels c: dL/da_c = sum_h a_h R (R from gate_grads); dot = sum_c dL/da_c a_c
    # over the sample (softmax gate only).
    acc = tl.zeros([c.shape[0], BLOCK_H], ACC)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = c_ok[:, None] & (h < H)[None, :]
        off = (b64 * C + c)[:, None] * H + h[None, :]
        acc += tl.load(r_ptr + off, mask=m, other=0.0).to(ACC) * tl.load(ah_ptr + off, mask=m, other=0.0).to(ACC)
    da = tl.sum(acc, axis=1)
    a = _channel_gate(o_ptr, b64, c, c_ok, C, SOFTMAX, BLOCK_CS, ACC)
    if SOFTMAX:
        return a * (da - dot), da * a
    else:
        return da * a * (1.0 - a), da * a


@triton.jit
def _normalised(y_b, c, c_ok, n, N, mu, rstd, gamma, beta):
    # (mask, Yhat, Yn) of channels c at positions n
    m = c_ok[:, None] & (n < N)[None, :]
    off = c[:, None] * N + n[None, :]
    yhat = tl.where(m, (tl.load(y_b + off, mask=m, other=0.0) - mu) * rstd, 0.0)
    return m, off, yhat, tl.where(m, gamma[:, None] * yhat + beta[:, None], 0.0)


@triton.jit
def _channel_consts(gn_w, gn_b, wq, wk, wv, dvbar_b, c, c_ok, N, ACC: tl.constexpr):
    # Per channel: GroupNorm(1)'s affine, the q and k weights, and dL/dV = wv dL/dvbar / N (V's
    # part of dL/dYn, the same at every position).
    w_v = tl.load(wv + c, mask=c_ok, other=0.0).to(ACC)
    return (tl.load(gn_w + c, mask=c_ok, other=0.0).to(ACC), tl.load(gn_b + c, mask=c_ok, other=0.0).to(ACC),
            tl.load(wq + c, mask=c_ok, other=0.0).to(ACC), tl.load(wk + c, mask=c_ok, other=0.0).to(ACC),
            w_v * tl.load(dvbar_b + c, mask=c_ok, other=0.0) / N)


@triton.jit
def _dyn(dq_b, dk_b, off, m, w_q, w_k, dv):
    # dL/dQ, dL/dK and dL/dYn = wq dQ + wk dK + wv dV at the tile `off`
    dq = tl.load(dq_b + off, mask=m, other=0.0)
    dk = tl.load(dk_b + off, mask=m, other=0.0)
    return dq, dk, tl.where(m, w_q[:, None] * dq + w_k[:, None] * dk + dv[:, None], 0.0)


@triton.jit
def _channel_norm_bwd(y_b, dq_b, dk_b, dvbar_b, dy_b, part_b, gn_w, gn_b, wq, wk, wv, C, N, window, mu, rstd,
                      HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    # From dL/dQ, dL/dK (C, N) and dL/dvbar (C): the q/k/v and GroupNorm(1) parameter gradients into
    # part_b (norm_c weight, bias, q/k/v weights, q/k/v biases: C each) and dL/dY / window into dy_b.
    s1 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    s2 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        gamma, beta, w_q, w_k, dv = _channel_consts(gn_w, gn_b, wq, wk, wv, dvbar_b, c, c_ok, N, ACC)
        dgamma = tl.zeros([BLOCK_C], ACC)
        dbeta = tl.zeros([BLOCK_C], ACC)
        dwq = tl.zeros([BLOCK_C], ACC)
        dwk = tl.zeros([BLOCK_C], ACC)
        yn_sum = tl.zeros([BLOCK_C], ACC)
        dbq = tl.zeros([BLOCK_C], ACC)
        dbk = tl.zeros([BLOCK_C], ACC)
        for n0 in range(0, N, BLOCK_N):
            m, off, yhat, yn = _normalised(y_b, c, c_ok, n0 + tl.arange(0, BLOCK_N), N, mu, rstd, gamma, beta)
            dq, dk, dyn = _dyn(dq_b, dk_b, off, m, w_q, w_k, dv)
            dgamma += tl.sum(dyn * yhat, axis=1)
            dbeta += tl.sum(dyn, axis=1)
            dwq += tl.sum(dq * yn, axis=1)
            dwk += tl.sum(dk * yn, axis=1)
            yn_sum += tl.sum(yn, axis=1)
            dbq += tl.sum(dq, axis=1)
            dbk += tl.sum(dk, axis=1)
            s1 += gamma[:, None] * dyn
            s2 += gamma[:, None] * dyn * yhat
        tl.store(part_b + c, dgamma, mask=c_ok)
        tl.store(part_b + C + c, dbeta, mask=c_ok)
        tl.store(part_b + 2 * C + c, dwq, mask=c_ok)
        tl.store(part_b + 3 * C + c, dwk, mask=c_ok)
        dvbar = tl.load(dvbar_b + c, mask=c_ok, other=0.0)
        tl.store(part_b + 4 * C + c, dvbar / N * yn_sum, mask=c_ok)
        if HAS_BIAS:
            tl.store(part_b + 5 * C + c, dbq, mask=c_ok)
            tl.store(part_b + 6 * C + c, dbk, mask=c_ok)
            tl.store(part_b + 7 * C + c, dvbar, mask=c_ok)
    m1 = tl.sum(tl.sum(s1, axis=1), axis=0) / (C * N)
    m2 = tl.sum(tl.sum(s2, axis=1), axis=0) / (C * N)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        gamma, beta, w_q, w_k, dv = _channel_consts(gn_w, gn_b, wq, wk, wv, dvbar_b, c, c_ok, N, ACC)
        for n0 in range(0, N, BLOCK_N):
            m, off, yhat, yn = _normalised(y_b, c, c_ok, n0 + tl.arange(0, BLOCK_N), N, mu, rstd, gamma, beta)
            dq, dk, dyn = _dyn(dq_b, dk_b, off, m, w_q, w_k, dv)
            tl.store(dy_b + off, rstd * (gamma[:, None] * dyn - m1 - yhat * m2) / window, mask=m)


@triton.jit
def _probabilities(y_b, stats_b, BC, ci, i_ok, cj, j_ok, wq, bq, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N, inv_sqrt_d,
                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    # Queries ci against keys cj, from the rows' saved statistics (log-sum-exp, o, do; stride BC):
    # dS / sqrt(D) = P do (vbar - o) / sqrt(D), P do, and the queries' affine.
    aq, bq_ = _affine(wq, bq, gn_w, gn_b, ci, i_ok, mu, rstd, HAS_BIAS, ACC)
    s, vbar = _scores(y_b, ci, i_ok, aq, bq_, cj, j_ok, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N, inv_sqrt_d,
                      HAS_BIAS, BLOCK, BLOCK, BLOCK_N, ACC)
    lse = tl.load(stats_b + ci, mask=i_ok, other=0.0)
    o = tl.load(stats_b + BC + ci, mask=i_ok, other=0.0)
    do = tl.load(stats_b + 2 * BC + ci, mask=i_ok, other=0.0)
    pd = tl.where(i_ok[:, None], tl.exp(s - lse[:, None]), 0.0) * do[:, None]
    return pd * (vbar[None, :] - o[:, None]) * inv_sqrt_d[:, None], pd, aq, bq_


@triton.jit
def _dq_tile(y_b, stats_b, BC, ci, i_ok, cj, j_ok, n, N, wq, bq, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, inv_sqrt_d,
             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    # dQ[ci, n] += dS K[cj, n] / sqrt(D)
    ds, _, _, _ = _probabilities(y_b, stats_b, BC, ci, i_ok, cj, j_ok, wq, bq, wk, bk, wv, bv, gn_w, gn_b, mu, rstd,
                                 N, inv_sqrt_d, HAS_BIAS, BLOCK, BLOCK_N, ACC)
    ak, bk_ = _affine(wk, bk, gn_w, gn_b, cj, j_ok, mu, rstd, HAS_BIAS, ACC)
    k, _ = _tile(y_b, cj, j_ok, ak, bk_, n, n < N, N, ACC)
    return tl.dot(ds, k, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _dk_tile(y_b, stats_b, BC, ci, i_ok, cj, j_ok, n, N, wq, bq, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, inv_sqrt_d,
             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    # dK[cj, n] += dS^T Q[ci, n] / sqrt(D), and dvbar[cj] += sum_i P do
    ds, pd, aq, bq_ = _probabilities(y_b, stats_b, BC, ci, i_ok, cj, j_ok, wq, bq, wk, bk, wv, bv, gn_w, gn_b, mu,
                                     rstd, N, inv_sqrt_d, HAS_BIAS, BLOCK, BLOCK_N, ACC)
    q, _ = _tile(y_b, ci, i_ok, aq, bq_, n, n < N, N, ACC)
    return tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=ACC), tl.sum(pd, axis=0)


@triton.jit
def _channel_attention_bwd_kernel(
    y_ptr,  # (B, C, N) pooled map
    o_ptr,  # (B, C) the forward's logits
    r_ptr, ah_ptr,  # (B, C, H) gate_grads' R and a_h: dL/da_c = sum_h a_h R
    gn_w, gn_b, wq, wk, wv, bq, bk, bv,  # (C,) as in the forward
    stats_ptr,  # (3, B, C) workspace: per query channel log-sum-exp, o, dL/do
    dq_ptr, dk_ptr,  # (B, C, N) workspaces: dL/dQ, dL/dK
    dvbar_ptr,  # (B, C) workspace: dL/dvbar
    dy_ptr,  # (B, C, HO, WO) out: dL/dY / (KH KW)
    part_ptr,  # (B, P) out: per-sample parameter gradients; this kernel fills norm_c and q/k/v at off_c
    B, C, N, D, H, heads, window, P, off_c, eps: tl.float64,
    HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CS: tl.constexpr, ACC: tl.constexpr,
):
    # One program per sample: the GroupNorm(1) backward needs every head's dQ, dK. Per head, three
    # sweeps over (query block, key block): the rows' softmax statistics, then dQ (query-major) and
    # dK, dvbar (key-major), the scores recomputed from Y each time (flash attention's backward with
    # channels as tokens and the N pooled positions as features, tiled over N too).
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    y_b = y_ptr + b64 * C * N
    mu, rstd = group_norm_stats(y_b, C * N, eps, BLOCK_S, ACC)
    inv_sqrt_d = 1.0 / tl.sqrt(tl.zeros([BLOCK_I], ACC) + D)
    dot = tl.sum(tl.zeros([BLOCK_CS], ACC), axis=0)
    if SOFTMAX:
        dots = tl.zeros([BLOCK_CS], ACC)
        for c0 in range(0, C, BLOCK_CS):
            cs = c0 + tl.arange(0, BLOCK_CS)
            _, da_a = _logit_grad(o_ptr, r_ptr, ah_ptr, b64, cs, cs < C, C, H, dot, SOFTMAX, BLOCK_H, BLOCK_CS, ACC)
            dots += tl.where(cs < C, da_a, 0.0)
        dot = tl.sum(dots, axis=0)
    stats_b = stats_ptr + b64 * C
    for head in range(heads):
        for i0 in range(0, D, BLOCK_I):
            ci = head * D + i0 + tl.arange(0, BLOCK_I)
            i_ok = i0 + tl.arange(0, BLOCK_I) < D
            aq, bq_ = _affine(wq, bq, gn_w, gn_b, ci, i_ok, mu, rstd, HAS_BIAS, ACC)
            m_i, l_i, o_num = _softmax_rows(y_b, ci, i_ok, aq, bq_, head, D, wk, bk, wv, bv, gn_w, gn_b, mu, rstd, N,
                                            inv_sqrt_d, HAS_BIAS, BLOCK_I, BLOCK_I, BLOCK_N, ACC)
            do, _ = _logit_grad(o_ptr, r_ptr, ah_ptr, b64, ci, i_ok, C, H, dot, SOFTMAX, BLOCK_H, BLOCK_CS, ACC)
            tl.store(stats_b + ci, m_i + tl.log(l_i), mask=i_ok)
            tl.store(stats_b + B * C + ci, o_num / l_i, mask=i_ok)
            tl.store(stats_b + 2 * B * C + ci, tl.where(i_ok, do, 0.0), mask=i_ok)
        tl.debug_barrier()
        for a0 in range(0, D, BLOCK_I):  # a0: the query block (dQ), then the key block (dK, dvbar)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                ca = head * D + a0 + tl.arange(0, BLOCK_I)
                a_ok = a0 + tl.arange(0, BLOCK_I) < D
                m = a_ok[:, None] & (n < N)[None, :]
                off = (b64 * C + ca)[:, None] * N + n[None, :]
                # dQ of queries ca against keys ce, then dK, dvbar of keys ca against queries ce: two
                # sweeps, not one, so that only one accumulator tile is live (registers, not work:
                # each score tile is computed once either way)
                dq = tl.zeros([BLOCK_I, BLOCK_N], ACC)
                for e0 in range(0, D, BLOCK_I):
                    ce = head * D + e0 + tl.arange(0, BLOCK_I)
                    e_ok = e0 + tl.arange(0, BLOCK_I) < D
                    dq += _dq_tile(y_b, stats_b, B * C, ca, a_ok, ce, e_ok, n, N, wq, bq, wk, bk, wv, bv, gn_w,
                                   gn_b, mu, rstd, inv_sqrt_d, HAS_BIAS, BLOCK_I, BLOCK_N, ACC)
                tl.store(dq_ptr + off, dq, mask=m)
                dk = tl.zeros([BLOCK_I, BLOCK_N], ACC)
                dv = tl.zeros([BLOCK_I], ACC)
                for e0 in range(0, D, BLOCK_I):
                    ce = head * D + e0 + tl.arange(0, BLOCK_I)
                    e_ok = e0 + tl.arange(0, BLOCK_I) < D
                    dk_t, dv_t = _dk_tile(y_b, stats_b, B * C, ce, e_ok, ca, a_ok, n, N, wq, bq, wk, bk, wv, bv,
                                          gn_w, gn_b, mu, rstd, inv_sqrt_d, HAS_BIAS, BLOCK_I, BLOCK_N, ACC)
                    dk += dk_t
                    dv += dv_t
                tl.store(dk_ptr + off, dk, mask=m)
                tl.store(dvbar_ptr + b64 * C + ca, dv, mask=a_ok & lt_block(n0, 1, dv))
    tl.debug_barrier()
    _channel_norm_bwd(y_b, dq_ptr + b64 * C * N, dk_ptr + b64 * C * N, dvbar_ptr + b64 * C, dy_ptr + b64 * C * N,
                      part_ptr + b64 * P + off_c, gn_w, gn_b, wq, wk, wv, C, N, window, mu, rstd,
                      HAS_BIAS, BLOCK_I, BLOCK_N, ACC)


@memo
def _backward_config(B, C, ho, wo, H, acc, has_bias, softmax):
    """(launch options, the allocations of stats, dQ and dK, dvbar, dY) of the backward launch."""
    # 16 x 16 tiles (tl.dot's minimum): a step holds an accumulator (dQ or dK) and a score tile with
    # their operands, which at 32 x 32 spilled (ptxas, sm_90: 255 registers and 2.6 KB of spills);
    # 8 warps and no software pipelining keep it under 128 registers (4 warps: 144).
    bi = bn = 16
    opts = options(HAS_BIAS=has_bias, SOFTMAX=softmax, BLOCK_I=bi, BLOCK_N=bn, BLOCK_S=STATS_BLOCK,
                   BLOCK_H=min(64, pow2(H)), BLOCK_CS=min(1024, pow2(C)), ACC=tl_dtype(acc), num_warps=8,
                   num_stages=1)
    return opts, (dense(3, B, C), dense(B, C, ho * wo), dense(B, C), dense(B, C, ho, wo))


def channel_attention_backward(y, o, r, ah, norm, qkv_weights, qkv_biases, head_num, window, softmax, eps, part,
                               off_c):
    """dL/dY / (KH KW) (B, C, HO, WO) from gate_grads' R; fills the norm_c and q/k/v partials of
    `part` (B, P) at column off_c."""
    B, C, ho, wo = y.shape
    N, D, H = ho * wo, C // head_num, ah.shape[2]
    acc = y.dtype
    has_bias = qkv_biases[0] is not None
    opts, (stats_spec, dq_spec, dvbar_spec, dy_spec) = _backward_config(B, C, ho, wo, H, acc, has_bias, softmax)
    stats = alloc(stats_spec, acc, y.device)
    dq, dk = alloc(dq_spec, acc, y.device), alloc(dq_spec, acc, y.device)
    dvbar = alloc(dvbar_spec, acc, y.device)
    dy = alloc(dy_spec, acc, y.device)
    biases = qkv_biases if has_bias else qkv_weights  # placeholders, never read
    launch(_channel_attention_bwd_kernel, (B,), opts,
        y, o, r, ah, *norm, *qkv_weights, *biases, stats, dq, dk, dvbar, dy, part,
        B, C, N, D, H, head_num, window[0] * window[1], part.shape[1], off_c, eps)
    return dy
