"""Launch heuristics shared by every SCSA Triton kernel (no autotuning: shapes are known up front)."""
import os

import torch
import triton
import triton.language as tl
from torch._library.triton import is_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..library import contiguous_strides, memo, output_format

# Tests set SCSA_OPS_POISON=1 so every output starts as NaN and an element a kernel forgets to
# write fails loudly; production allocations stay uninitialised (a memset would be a full pass).
_POISON = os.environ.get("SCSA_OPS_POISON", "0") == "1"
# Triton reads this when a kernel is decorated: it holds for the life of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Register budget of a plane kernel's tile: THREAD_BYTES of it per thread (4 fp32 or 2 fp64
# values), over at most 8 warps: ptxas then keeps the handful of tiles a pass holds (data, gates,
# accumulators, addresses) under 128 registers without spilling (sm_90, every preset's launch:
# bench/gpu_model.py), and small maps get twice the programs that 8 values a thread gave.
THREAD_BYTES = 16
MAX_WARPS = 8
# Every launch's register budget (PTX .maxnreg): 2 CTAs of 8 warps an SM. Without one, ptxas 13.4
# under Triton's --regAllocOptLevel=2 spilled some kernels at 40-64 registers (the spatial gates
# at 14 x 14 and 112 x 112, by 16-244 bytes) where a budget compiles them spill-free; a kernel
# that needs more than this spills visibly (bench/gpu_model.py, tests/test_aot_compile.py).
MAX_REGISTERS = 128
# Widest row (in padded elements) the plane kernels hold at once (one channel a program at that
# width, 8 fp32 a thread); wider maps, W > 2048, use the eager path.
MAX_ROW = 2048


def dense(*shape):
    """An output's allocation: (shape, contiguous strides), computed once per shape in a launcher's
    memoised _config (torch.empty_strided costs two thirds of torch.empty's host time)."""
    return shape, contiguous_strides(shape)


def alloc(spec, dtype, device):
    """A new tensor of `spec` (dense) and `dtype` on `device`."""
    out = torch.empty_strided(*spec, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _POISON else out


def alloc_like(x):
    """A full-size output in the layout rule of every provider and fake (library.output_format):
    channels_last for a channels_last input, contiguous for anything else. (empty_like: a third
    of torch.empty's host time with a memory format.)"""
    out = torch.empty_like(x, memory_format=output_format(x))
    return out.fill_(float("nan")) if _POISON else out


_TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype):
    return _TL_DTYPES[dtype]


def cdiv(a, b):
    """ceil(a / b) for host code: triton.cdiv is a constexpr_function, ~5 us a call on the host."""
    return -(-a // b)


def pow2(n):
    """Smallest power of two >= n. Comparisons, not int(n): under torch.compile(dynamic=True) n is
    symbolic, and this guards on n's power-of-two range instead of specialising on its value."""
    p = 1
    while p < n:
        p *= 2
    return p


def options(fp_fusion=True, **meta):
    """A launch's keyword arguments (constexprs, num_warps, ...) with the register budget and the
    kernel's choice of FMA contraction, stated rather than left to the release's default (on until
    triton 3.9, off from 3.10), so that a kernel rounds the same way under every triton and the
    AOT compiles (bench.aot_compile, bench.gpu_model) bind the same choice. Contraction (a * b + c
    rounded once) is what every kernel's error bounds were established with, and none relies on
    a product being rounded on its own. Built once per shape in a launcher's memoised _config."""
    return dict(meta, maxnreg=MAX_REGISTERS, enable_fp_fusion=fp_fusion)


def launch(kernel, grid, opts, *args):
    """kernel[grid](*args, **opts) (opts: from `options`) through torch.library.wrap_triton, so
    torch.compile and torch.export capture it (in eager mode wrap_triton is switched off and calls
    the kernel itself: library.Provider). Interpreted kernels are plain Python that wrap_triton
    cannot capture (the ops are opaque custom ops there: register_triton_ops): they run directly,
    except on fake tensors (shape propagation), where there is nothing to run."""
    if INTERPRET:
        if not any(is_fake(a) for a in args if isinstance(a, torch.Tensor)):
            kernel.run(*args, grid=grid, warmup=False, **opts)
    elif not is_wrap_triton_enabled():  # eager: what kernel[grid](...) and wrap_triton would call
        kernel.run(*args, grid=grid, warmup=False, **opts)
    else:
        wrap_triton(kernel)[grid](*args, **opts)


def tile_elems(dtype):
    """Values of `dtype` in a full register budget (MAX_WARPS warps of THREAD_BYTES a thread)."""
    return MAX_WARPS * 32 * THREAD_BYTES // dtype.itemsize


def channel_vector(strides, dtype, vec):
    """Elements of a `dtype` tensor of `strides` a thread of a forward plane kernel holds side by
    side, for accesses as wide as the layout allows: `vec` along W (NCHW: vector_width), 16 bytes
    along C for channels_last (a unit C stride, which the JIT specialises on, with C a multiple of
    16 as a rule)."""
    return 16 // dtype.itemsize if strides[1] == 1 and strides[3] != 1 else vec


@memo
def channel_block(row_elems, channels, dtype, vec, thread_bytes=THREAD_BYTES):
    """(channels per program, num_warps) for a [channels, row_elems] tile of `dtype` values read
    `vec` elements at a time: thread_bytes of it a thread, but at least one whole vector (8 fp16
    need 8 fp32 accumulators each thread, or the layout splits the 128-bit access); as many
    channels as fill MAX_WARPS warps, fewer warps for a sample with fewer channels."""
    thread_bytes = max(thread_bytes, vec * dtype.itemsize)
    bc = max(1, min(pow2(channels), MAX_WARPS * 32 * thread_bytes // (row_elems * dtype.itemsize)))
    return bc, max(1, min(MAX_WARPS, bc * row_elems * dtype.itemsize // (32 * thread_bytes)))


@memo
def window_tile(w, kw):
    """(BLOCK_J, BLOCK_K): the windows of kw columns of a w-wide row, as window_sums regroups them."""
    return pow2(cdiv(w, kw)), pow2(kw)


@memo
def row_tile(w, kw):
    """Elements of one channel's row tile in the window kernels: the row, or its regrouped windows."""
    bj, bk = window_tile(w, kw)
    return max(pow2(w), bj * bk)


def fits(w, window_w):
    """Whether one program can hold a full row of width w (plain and as windows)."""
    return row_tile(w, window_w) <= MAX_ROW


@memo
def vector_width(widths, itemsize, *strides):
    """Elements per global access the plane kernels may assume along W: the widest power of two,
    up to 16 bytes of `itemsize` elements, that divides each of `widths` (row lengths) and every
    other stride of every full-size tensor (`strides`: their stride() tuples), whose W stride must
    be 1 (else 1, e.g. channels_last). The JIT only marks integers divisible by 16, and no ResNet
    width (56, 28, 14, 7) is one, so without this hint every NCHW access is scalar. Symbolic sizes
    (torch.compile with dynamic shapes) get 1: a guard on each size's alignment would recompile
    the graph per alignment class as well as per tile bucket, past dynamo's recompile limit."""
    bits = 0  # the OR of every value: its lowest set bit is the largest power of two dividing all
    for sb, sc, sh, sw in strides:
        if sw != 1:
            return 1
        bits |= sb | sc | sh
    for w in widths:
        bits |= w
    if isinstance(bits, torch.SymInt):
        return 1
    vec = 16 // itemsize
    return vec if bits == 0 else min(vec, bits & -bits)


@triton.jit
def as_acc(v, ACC: tl.constexpr):
    """A float argument as an ACC scalar. Kernels annotate float arguments `tl.float64`: the GPU JIT
    types an unannotated Python float fp32, which would round eps = 1e-5 in fp64 runs (the
    interpreter passes the Python float itself, so only a GPU showed it)."""
    return tl.sum(tl.zeros([1], ACC) + v, axis=0).to(ACC)


@triton.jit
def aligned(n, VEC: tl.constexpr):
    """n, which the launcher checked is a multiple of VEC (vector_width), written so that the
    compiler's divisibility analysis sees it (tl.multiple_of does not attach to a kernel argument)."""
    return n // VEC * VEC


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
def window_sums(v, KW, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_C, BLOCK_W] row tile -> [BLOCK_C, BLOCK_J] sums over windows of KW columns (window j:
    columns j * KW ... j * KW + KW - 1). Rows are loaded whole and contiguous, so the loads are
    vector-wide; a gather then regroups the columns as [BLOCK_J windows, BLOCK_K columns], once
    per tile instead of one unaligned window-shaped load per row (KW = 7 aligns to nothing)."""
    BLOCK_C: tl.constexpr = v.shape[0]
    BLOCK_W: tl.constexpr = v.shape[1]
    if BLOCK_J == 1:  # one window a row (7x7 maps, global pooling): nothing to regroup
        return tl.sum(tl.where((tl.arange(0, BLOCK_W) < KW)[None, :], v, 0.0), axis=1)[:, None]
    t = tl.arange(0, BLOCK_K)
    col = tl.minimum(tl.arange(0, BLOCK_J)[:, None] * KW + t[None, :], BLOCK_W - 1)
    idx = tl.broadcast_to(tl.reshape(col, [1, BLOCK_J * BLOCK_K]), [BLOCK_C, BLOCK_J * BLOCK_K])
    windows = tl.reshape(tl.gather(v, idx, 1), [BLOCK_C, BLOCK_J, BLOCK_K])
    return tl.sum(tl.where((t < KW)[None, None, :], windows, 0.0), axis=2)
