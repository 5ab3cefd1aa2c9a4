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

from .utils import alloc, as_acc, launch, pow2, tl_dtype

# Elements of Y per step of the GroupNorm(1) statistics sweep (the whole sample, C * N values).
STATS_BLOCK = 1024


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
    # GroupNorm(1) statistics of this sample, shifted by its first element for a stable one-pass
    # variance; every program of the sample recomputes them (Y is 1/49 of X, usually cached).
    shift = tl.load(y_b).to(ACC)
    s1 = tl.zeros([BLOCK_S], ACC)
    s2 = tl.zeros([BLOCK_S], ACC)
    for k0 in range(0, C * N, BLOCK_S):
        k = k0 + tl.arange(0, BLOCK_S)
        d = tl.where(k < C * N, tl.load(y_b + k, mask=k < C * N, other=0.0).to(ACC) - shift, 0.0)
        s1 += d
        s2 += d * d
    mean_d = tl.sum(s1, axis=0) / (C * N)
    mu = shift + mean_d
    rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(s2, axis=0) / (C * N) - mean_d * mean_d, 0.0) + as_acc(eps, ACC))

    qi = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    ci = head * D + qi
    i_ok = qi < D
    aq, bq_ = _affine(wq, bq, gn_w, gn_b, ci, i_ok, mu, rstd, HAS_BIAS, ACC)
    inv_sqrt_d = 1.0 / tl.sqrt(tl.zeros([BLOCK_J], ACC) + D)  # in ACC: an fp32 scalar arg would cap fp64 runs
    m_i = tl.full([BLOCK_I], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_I], ACC)
    acc = tl.zeros([BLOCK_I], ACC)
    for j0 in range(0, D, BLOCK_J):
        kj = j0 + tl.arange(0, BLOCK_J)
        cj = head * D + kj
        j_ok = kj < D
        ak, bk_ = _affine(wk, bk, gn_w, gn_b, cj, j_ok, mu, rstd, HAS_BIAS, ACC)
        av, bv_ = _affine(wv, bv, gn_w, gn_b, cj, j_ok, mu, rstd, HAS_BIAS, ACC)
        s = tl.zeros([BLOCK_I, BLOCK_J], ACC)
        ysum = tl.zeros([BLOCK_J], ACC)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < N
            mq = i_ok[:, None] & n_ok[None, :]
            mk = j_ok[:, None] & n_ok[None, :]
            yq = tl.load(y_b + ci[:, None] * N + n[None, :], mask=mq, other=0.0).to(ACC)
            yk = tl.load(y_b + cj[:, None] * N + n[None, :], mask=mk, other=0.0).to(ACC)
            q = tl.where(mq, aq[:, None] * yq + bq_[:, None], 0.0)
            k = tl.where(mk, ak[:, None] * yk + bk_[:, None], 0.0)
            s += tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC)
            ysum += tl.sum(yk, axis=1)
        vbar = av * (ysum / N) + bv_
        s = tl.where(j_ok[None, :], s * inv_sqrt_d[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr + tl.sum(p * vbar[None, :], axis=1)
        m_i = m_new
    tl.store(o_ptr + b.to(tl.int64) * C + ci, acc / l_i, mask=i_ok)


def channel_attention(y, norm, qkv_weights, qkv_biases, head_num, eps):
    """Logits o (B, C) of DESIGN.md step 10, in y's dtype."""
    B, C = y.shape[:2]
    N = y.shape[2] * y.shape[3]
    D = C // head_num
    # tl.dot needs >= 16 per side; 32 keeps three fp32 32x32 tiles (q, k, scores) in registers.
    side = 32 if y.dtype == torch.float32 else 16
    bi = min(side, max(16, pow2(D)))
    bn = 16 if N <= 16 else side  # = min(side, max(16, pow2(N))), one comparison for compile guards
    o = alloc((B, C), y.dtype, y.device)
    has_bias = qkv_biases[0] is not None
    biases = qkv_biases if has_bias else qkv_weights  # placeholders, never read
    launch(_channel_attention_fwd_kernel, (B, head_num, triton.cdiv(D, bi)),
        y, o, *norm, *qkv_weights, *biases, C, N, D, eps,
        HAS_BIAS=has_bias, BLOCK_I=bi, BLOCK_J=bi, BLOCK_N=bn, BLOCK_S=STATS_BLOCK,
        ACC=tl_dtype(y.dtype), num_warps=4)
    return o
