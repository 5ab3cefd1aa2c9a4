"""DESIGN.md 3.3: the parameter gradients, summed over the batch from per-sample partials in a fixed
order (no atomics: bitwise reproducible, whatever the grid). The partials hold the conv gradients
once per branch (the H and W branches share the four convs); they are added here too."""
import triton
import triton.language as tl

from .utils import cdiv, launch, memo, options, tl_dtype

BLOCK = 1024  # gradient elements per program


@triton.jit
def _param_grads_kernel(
    part_ptr,  # (B, P) per-sample partials: the H branch's conv gradients, the W branch's, the rest
    out_ptr,  # (P - conv_size,) out: every gradient, flat, in schema.PARAM_NAMES order
    B, P, conv_size,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = k < P - conv_size
    conv = k < conv_size
    first = tl.where(conv, k, k + conv_size)
    acc = tl.zeros([BLOCK], ACC)
    for b in range(B):
        row = part_ptr + b * P.to(tl.int64)
        acc += tl.load(row + first, mask=ok, other=0.0)
        acc += tl.load(row + k + conv_size, mask=ok & conv, other=0.0)
    tl.store(out_ptr + k, acc, mask=ok)


@memo
def _config(P, conv_size, acc):
    """(grid, launch options) of a param_grads launch."""
    return (cdiv(P - conv_size, BLOCK),), options(BLOCK=BLOCK, ACC=tl_dtype(acc), num_warps=4)


def param_grads(part, conv_size, out):
    B, P = part.shape
    grid, opts = _config(P, conv_size, part.dtype)
    launch(_param_grads_kernel, grid, opts, part, out, B, P, conv_size)
    return out
