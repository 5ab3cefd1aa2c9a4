"""F5 of DESIGN.md, out = X * a_h * a_w * a_c, and the backward's last full-size pass, which has
the same shape: dX = (g * a_c + up(dY)) * a_h * a_w + dp_h / W + dp_w / H. One kernel, switched
by INPUT_GRAD. The channel gate a_c is computed here from the logits o, since a softmax gate
needs every channel of the sample (each program re-reads the B x C logits of its sample)."""
import triton
import triton.language as tl
from torch import Tensor

from .utils import (
    aligned,
    alloc_like,
    cdiv,
    channel_block,
    channel_vector,
    launch,
    lt_block,
    memo,
    options,
    pow2,
    sample_channels,
    tl_dtype,
    vector_width,
)

# Rows per program: the gates of a row tile (a_w, a_c, and dp_w for the backward) are loaded once
# and reused over ROWS rows; 4 keeps the tile's registers under the budget of utils.channel_block.
ROWS = 4
# Channels per step of the softmax gate's sweep over the sample's logits.
SOFTMAX_BLOCK = 1024


@triton.jit
def _channel_gate(o_ptr, b64, c, c_ok, C, SOFTMAX: tl.constexpr, BLOCK_CS: tl.constexpr,
                  ACC: tl.constexpr):
    o = tl.load(o_ptr + b64 * C + c, mask=c_ok, other=0.0).to(ACC)
    if SOFTMAX:  # over all channels of the sample
        mx = tl.full([BLOCK_CS], float("-inf"), ACC)
        for k0 in range(0, C, BLOCK_CS):
            k = k0 + tl.arange(0, BLOCK_CS)
            mx = tl.maximum(mx, tl.load(o_ptr + b64 * C + k, mask=k < C, other=float("-inf")).to(ACC))
        m = tl.max(mx, axis=0)
        den = tl.zeros([BLOCK_CS], ACC)
        for k0 in range(0, C, BLOCK_CS):
            k = k0 + tl.arange(0, BLOCK_CS)
            den += tl.where(k < C, tl.exp(tl.load(o_ptr + b64 * C + k, mask=k < C, other=0.0).to(ACC) - m), 0.0)
        return tl.exp(o - m) / tl.sum(den, axis=0)
    else:
        return 1.0 / (1.0 + tl.exp(-o))


@triton.jit
def _apply_gates_kernel(
    src_ptr,  # (B, C, H, W) any strides: X (forward) or the upstream gradient g (INPUT_GRAD)
    out_ptr,  # (B, C, H, W) out, strides sob..sow: out (forward) or dX (INPUT_GRAD)
    ah_ptr,  # (B, C, H)
    aw_ptr,  # (B, C, W)
    o_ptr,  # (B, C) channel-attention logits
    dy_ptr,  # INPUT_GRAD: (B, C, HO, WO) dL/dY already divided by KH * KW
    dph_ptr,  # INPUT_GRAD: (B, C, H) dL/dp_h / W
    dpw_ptr,  # INPUT_GRAD: (B, C, W) dL/dp_w / H
    C, H, W, HO, WO, KH, KW,
    ssb, ssc, ssh, ssw, sob, soc, soh, sow,
    INPUT_GRAD: tl.constexpr, SOFTMAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_CS: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr,
):
    W, ssb, ssc, ssh = aligned(W, VEC), aligned(ssb, VEC), aligned(ssc, VEC), aligned(ssh, VEC)
    sob, soc, soh = aligned(sob, VEC), aligned(soc, VEC), aligned(soh, VEC)
    b, c = sample_channels(C, BLOCK_C)
    w = tl.arange(0, BLOCK_W)
    c_ok, w_ok = c < C, w < W
    b64, c64, w64 = b.to(tl.int64), c.to(tl.int64), w.to(tl.int64)
    bc = b64 * C + c64
    a_c = _channel_gate(o_ptr, b64, c, c_ok, C, SOFTMAX, BLOCK_CS, ACC)
    a_w = tl.load(aw_ptr + bc[:, None] * W + w64[None, :], mask=c_ok[:, None] & w_ok[None, :], other=0.0).to(ACC)
    src = src_ptr + b64 * ssb + c64[:, None] * ssc + w64[None, :] * ssw
    dst = out_ptr + b64 * sob + c64[:, None] * soc + w64[None, :] * sow
    if INPUT_GRAD:
        dpw = tl.load(dpw_ptr + bc[:, None] * W + w64[None, :], mask=c_ok[:, None] & w_ok[None, :], other=0.0).to(ACC)
        wo = w // KW
    for r in range(ROWS):
        h = tl.program_id(1) * ROWS + r
        h64 = h.to(tl.int64)
        row_ok = c_ok & lt_block(h, H, c)
        m = row_ok[:, None] & w_ok[None, :]
        a_h = tl.load(ah_ptr + bc * H + h, mask=row_ok, other=0.0).to(ACC)
        v = tl.load(src + h64 * ssh, mask=m, other=0.0).to(ACC)
        gate = a_h[:, None] * a_w
        if INPUT_GRAD:
            covered = (m & lt_block(h, HO * KH, c)[:, None]) & (wo < WO)[None, :]
            dy = tl.load(dy_ptr + (bc[:, None] * HO + h // KH) * WO + wo[None, :], mask=covered, other=0.0).to(ACC)
            dph = tl.load(dph_ptr + bc * H + h, mask=row_ok, other=0.0).to(ACC)
            res = (v * a_c[:, None] + dy) * gate + dph[:, None] + dpw
        else:
            res = v * gate * a_c[:, None]
        tl.store(dst + h64 * soh, res.to(out_ptr.dtype.element_ty), mask=m)


@memo
def _config(shape, src_strides, out_strides, dtype, acc, softmax, input_grad):
    """(grid, launch options) of an apply_gates launch (forward or input gradient); the output is
    allocated by alloc_like."""
    B, C, H, W = shape
    bw = pow2(W)
    vec = vector_width((W,), dtype.itemsize, src_strides, out_strides)
    # The input gradient holds twice the tiles: channels_last vectors of 8 fp16 took it to 151 registers.
    bc, warps = channel_block(bw, C, acc, vec if input_grad else channel_vector(out_strides, dtype, vec))
    return (B * cdiv(C, bc), cdiv(H, ROWS)), options(
        INPUT_GRAD=input_grad, SOFTMAX=softmax, ROWS=ROWS, BLOCK_C=bc, BLOCK_W=bw,
        BLOCK_CS=min(SOFTMAX_BLOCK, pow2(C)), VEC=vec, ACC=tl_dtype(acc), num_warps=warps)


def _apply(src, out, ah, aw, o, dy, dph, dpw, window, softmax, input_grad):
    B, C, H, W = out.shape
    kh, kw = window
    src_strides, out_strides = src.stride(), out.stride()
    grid, opts = _config(out.shape, src_strides, out_strides, out.dtype, ah.dtype, softmax, input_grad)
    launch(_apply_gates_kernel, grid, opts, src, out, ah, aw, o, dy, dph, dpw, C, H, W, H // kh, W // kw, kh, kw,
           *src_strides, *out_strides)
    return out


def apply_gates(x, ah, aw, o, softmax):
    """out = X * a_h * a_w * gate(o), in x's dtype and memory format."""
    return _apply(x, alloc_like(x), ah, aw, o, o, o, o, (1, 1), softmax, input_grad=False)


def input_grad(g: Tensor, x: Tensor, ah: Tensor, aw: Tensor, o: Tensor, dy: Tensor, dph: Tensor, dpw: Tensor,
               kh: int, kw: int, softmax: bool) -> Tensor:
    """The op scsa_triton::input_grad: dX = (g * a_c + up(dy)) * a_h * a_w + dph + dpw, in x's dtype
    and memory format."""
    return _apply(g, alloc_like(x), ah, aw, o, dy, dph, dpw, (kh, kw), softmax, input_grad=True)
