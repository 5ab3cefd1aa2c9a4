"""Launch heuristics shared by every SCSA Triton kernel (no autotuning: shapes are known up front)."""
import os

import torch
import triton
import triton.language as tl

# Tests set SCSA_OPS_POISON=1 so every output starts as NaN and an element a kernel forgets to
# write fails loudly; production allocations stay uninitialised (a memset would be a full pass).
_POISON = os.environ.get("SCSA_OPS_POISON", "0") == "1"

# Register budget of one program's tile, in elements: 4 warps x 32 threads x 16 values each.
TILE_ELEMS = 2048
# Widest row (in padded elements) the plane kernels hold at once; wider maps use the eager path.
MAX_ROW = 8192


def alloc(shape, dtype, device):
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def alloc_like(x):
    """Output with x's memory format (NCHW or channels_last) for dense x, contiguous otherwise."""
    out = torch.empty_like(x)
    return out.fill_(float("nan")) if _POISON else out


def tl_dtype(dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32,
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def channel_block(row_elems, channels):
    """Channels per program so that one row tile holds about TILE_ELEMS elements."""
    return max(1, min(pow2(channels), TILE_ELEMS // row_elems))


def window_tile(w, kw):
    """(BLOCK_J, BLOCK_K): a row seen as windows j of kw columns, covering all w columns."""
    return pow2(triton.cdiv(w, kw)), pow2(kw)


def fits(w, window_w):
    """Whether one program can hold a full row of width w (plain and as windows)."""
    bj, bk = window_tile(w, window_w)
    return pow2(w) <= MAX_ROW and bj * bk <= MAX_ROW


def num_warps(tile_elems):
    return 8 if tile_elems >= 4096 else 4 if tile_elems >= 512 else 2


@triton.jit
def lt_block(i, n, like):
    """`i < n` for a scalar i, as a boolean block shaped like `like`. The interpreter turns
    `block & scalar_bool` into int32, which tl.load rejects as a mask; a block compare does not."""
    return (tl.zeros_like(like) + i) < n
