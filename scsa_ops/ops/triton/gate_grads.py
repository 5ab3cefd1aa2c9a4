"""First full-size pass of the backward (DESIGN.md section 3): one read of g and X yields every
sum the gate gradients need, so the small graphs can be differentiated without touching X again.

Per program: BLOCK_C channels of one sample, one row of pooling windows (KH rows; the rows and
columns that no window covers form one extra, partial window so that r and s see all of X):
  R[b,c,h]    = sum_w g X a_w              -> dL/da_h direct part, and dL/da_c = sum_h a_h R
  S[b,c,i,w]  = sum_{h in row i} g X a_h   -> dL/da_w direct part after a sum over i
  U[b,c,h,j]  = sum_{w in window j} X a_w  -> dL/da_h through the pooled path (with dY)
  V[b,c,i,w]  = sum_{h in row i} X a_h     -> dL/da_w through the pooled path (with dY)
Outputs are about 3/7 of X in fp32; each element is written by exactly one program."""
import triton
import triton.language as tl
from torch import Tensor

from .utils import (
    THREAD_BYTES,
    aligned,
    alloc,
    cdiv,
    channel_block,
    dense,
    launch,
    lt_block,
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
def _gate_grads_bwd_kernel(
    g_ptr,  # (B, C, H, W) upstream gradient, any strides
    x_ptr,  # (B, C, H, W) forward input, any strides
    ah_ptr,  # (B, C, H)
    aw_ptr,  # (B, C, W)
    r_ptr,  # (B, C, H) out
    s_ptr,  # (B, C, HC, W) out, HC = cdiv(H, KH)
    u_ptr,  # (B, C, HO * KH, WO) out
    v_ptr,  # (B, C, HO, WO * KW) out
    C, H, W, HC, HO, WO, KH, KW,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr, ACC: tl.constexpr,
):
    W, WV = aligned(W, VEC), aligned(WO * KW, VEC)
    sgb, sgc, sgh = aligned(sgb, VEC), aligned(sgc, VEC), aligned(sgh, VEC)
    sxb, sxc, sxh = aligned(sxb, VEC), aligned(sxc, VEC), aligned(sxh, VEC)
    b, c = sample_channels(C, BLOCK_C)
    i = tl.program_id(1)
    w = tl.arange(0, BLOCK_W)
    j = tl.arange(0, BLOCK_J)
    c_ok = c < C
    full_row = c_ok & lt_block(i, HO, c)  # window row i is a whole one, not the leftover rows
    m = c_ok[:, None] & (w < W)[None, :]
    b64, c64, w64 = b.to(tl.int64), c.to(tl.int64), w.to(tl.int64)
    bc = b64 * C + c64
    g_plane = g_ptr + b64 * sgb + c64[:, None] * sgc + w64[None, :] * sgw
    x_plane = x_ptr + b64 * sxb + c64[:, None] * sxc + w64[None, :] * sxw
    a_w = tl.load(aw_ptr + bc[:, None] * W + w[None, :], mask=m, other=0.0).to(ACC)
    s_acc = tl.zeros([BLOCK_C, BLOCK_W], ACC)
    v_acc = tl.zeros([BLOCK_C, BLOCK_W], ACC)
    for r in range(KH):
        h = i * KH + r
        h64 = h.to(tl.int64)
        row_ok = c_ok & lt_block(h, H, c)
        mh = m & row_ok[:, None]
        g = tl.load(g_plane + h64 * sgh, mask=mh, other=0.0).to(ACC)
        x = tl.load(x_plane + h64 * sxh, mask=mh, other=0.0).to(ACC)
        a_h = tl.load(ah_ptr + bc * H + h, mask=row_ok, other=0.0).to(ACC)[:, None]
        gx = g * x
        tl.store(r_ptr + bc * H + h, tl.sum(gx * a_w, axis=1), mask=row_ok)
        s_acc += gx * a_h
        v_acc += x * a_h
        tl.store(u_ptr + (bc[:, None] * (HO * KH) + h) * WO + j[None, :], window_sums(x * a_w, KW, BLOCK_J, BLOCK_K),
                 mask=full_row[:, None] & (j < WO)[None, :])
    tl.store(s_ptr + (bc[:, None] * HC + i) * W + w[None, :], s_acc, mask=m)
    tl.store(v_ptr + (bc[:, None] * HO + i) * WV + w[None, :], v_acc, mask=full_row[:, None] & (w < WV)[None, :])


@memo
def _config(shape, g_strides, x_strides, dtype, acc, kh, kw):
    """(grid, launch options, the allocations of R, S, U, V) of a gate_grads launch."""
    B, C, H, W = shape
    wo = W // kw
    bj, bk = window_tile(wo * kw, kw)
    # Half the usual tile a thread (a quarter for rows of 256 and more) beyond the row's vectors: g,
    # X, a_w, the S and V accumulators and the regrouped windows are live at once (ptxas, sm_90:
    # more spilled on detection maps, 100 x 167 and 200 x 334, under the 128-register budget).
    row = row_tile(W, kw)
    vec = vector_width((W, wo * kw), dtype.itemsize, g_strides, x_strides)
    bc, warps = channel_block(row, C, acc, vec, THREAD_BYTES // (4 if row >= 256 else 2))
    ho, hc = H // kh, cdiv(H, kh)
    return ((B * cdiv(C, bc), hc), options(BLOCK_C=bc, BLOCK_W=pow2(W), BLOCK_J=bj, BLOCK_K=bk, VEC=vec,
                                           ACC=tl_dtype(acc), num_warps=warps),
            (dense(B, C, H), dense(B, C, hc, W), dense(B, C, ho * kh, wo), dense(B, C, ho, wo * kw)))


def gate_grads(g: Tensor, x: Tensor, ah: Tensor, aw: Tensor, kh: int, kw: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op scsa_triton::gate_grads: R (B,C,H), S (B,C,HC,W), U (B,C,HO*KH,WO), V (B,C,HO,WO*KW)
    as documented above."""
    B, C, H, W = x.shape
    ho, wo, hc = H // kh, W // kw, cdiv(H, kh)
    acc = ah.dtype
    g_strides, x_strides = g.stride(), x.stride()
    grid, opts, specs = _config(x.shape, g_strides, x_strides, x.dtype, acc, kh, kw)
    r, s, u, v = [alloc(spec, acc, x.device) for spec in specs]
    launch(_gate_grads_bwd_kernel, grid, opts, g, x, ah, aw, r, s, u, v, C, H, W, hc, ho, wo, kh, kw, *g_strides,
           *x_strides)
    return r, s, u, v
