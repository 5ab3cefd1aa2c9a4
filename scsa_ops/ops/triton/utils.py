"""Launch heuristics shared by every SCSA Triton kernel (no autotuning: shapes are known up front)."""
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..library import output_format

# Tests set SCSA_OPS_POISON=1 so every output starts as NaN and an element a kernel forgets to
# write fails loudly; production allocations stay uninitialised (a memset would be a full pass).
_POISON = os.environ.get("SCSA_OPS_POISON", "0") == "1"
# Triton reads this when a kernel is decorated: it holds for the life of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Register budget of one program's tile: 2048 fp32 (1024 fp64) values, spread over 8 warps.
TILE_BYTES = 8192
# Widest row (in padded elements) the plane kernels hold at once (one channel of it is a whole
# tile); wider maps, W > 2048, use the eager path.
MAX_ROW = 2048


def alloc(shape, dtype, device, memory_format=torch.contiguous_format):
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if _POISON else out


def alloc_like(x):
    """A full-size output in the layout rule of every provider and fake (library.output_format):
    channels_last for a channels_last input, contiguous for anything else."""
    return alloc(x.shape, x.dtype, x.device, output_format(x))


def tl_dtype(dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32,
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def pow2(n):
    """Smallest power of two >= n. Comparisons, not int(n): under torch.compile(dynamic=True) n is
    symbolic, and this guards on n's power-of-two range instead of specialising on its value."""
    p = 1
    while p < n:
        p *= 2
    return p


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta) through torch.library.wrap_triton, so torch.compile and
    torch.export capture it. Interpreted kernels are plain Python that cannot be captured (torch
    hands them back unwrapped): on fake tensors (shape propagation, CPU tests) there is nothing to run."""
    if INTERPRET and any(is_fake(a) for a in args if isinstance(a, torch.Tensor)):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def tile_elems(dtype):
    return TILE_BYTES // dtype.itemsize


def channel_block(row_elems, channels, dtype):
    """Channels per program so that one row tile of `dtype` values fills the register budget."""
    return max(1, min(pow2(channels), tile_elems(dtype) // row_elems))


def window_tile(w, kw):
    """(BLOCK_J, BLOCK_K): a row seen as windows j of kw columns, covering all w columns."""
    return pow2(triton.cdiv(w, kw)), pow2(kw)


def fits(w, window_w):
    """Whether one program can hold a full row of width w (plain and as windows)."""
    bj, bk = window_tile(w, window_w)
    return pow2(w) <= MAX_ROW and bj * bk <= MAX_ROW


def num_warps(tile_elems, dtype):
    """About 8 fp32 (4 fp64) values of a tile per thread: ptxas then keeps the handful of tiles a
    pass holds (data, gates, accumulators, 64-bit addresses) in registers without spilling."""
    return max(1, min(8, tile_elems * dtype.itemsize // 1024))


@triton.jit
def as_acc(v, ACC: tl.constexpr):
    """A float argument as an ACC scalar. Kernels annotate float arguments `tl.float64`: the GPU JIT
    types an unannotated Python float fp32, which would round eps = 1e-5 in fp64 runs (the
    interpreter passes the Python float itself, so only a GPU showed it)."""
    return tl.sum(tl.zeros([1], ACC) + v, axis=0).to(ACC)


@triton.jit
def lt_block(i, n, like):
    """`i < n` for a scalar i, as a boolean block shaped like `like`. The interpreter turns
    `block & scalar_bool` into int32, which tl.load rejects as a mask; a block compare does not."""
    return (tl.zeros_like(like) + i) < n


@triton.jit
def sample_channels(C, BLOCK_C: tl.constexpr):
    """Axis 0 of a (B * cdiv(C, BLOCK_C), ...) grid -> (sample b, its BLOCK_C channel indices)."""
    n_cblk = tl.cdiv(C, BLOCK_C)
    b = tl.program_id(0) // n_cblk
    return b, (tl.program_id(0) % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def window_columns(KW, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """A row as [BLOCK_J windows, BLOCK_K columns]: (window j, column-in-window t, column w)."""
    j = tl.arange(0, BLOCK_J)
    t = tl.arange(0, BLOCK_K)
    return j, t, j[:, None] * KW + t[None, :]
