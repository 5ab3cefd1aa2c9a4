"""Non-finite parameters (a diverged model), decided on the device: one small launch after F4 reads
every parameter and, if any element is NaN or +-Inf, makes the channel-attention logits o NaN. The
output (x * a_h * a_w * gate(o)), the input gradient and every parameter gradient then are NaN
throughout, so no finite number stands where the eager module has a NaN or Inf (which elements
those are depends on how each eager op is written), and an AMP GradScaler skips the step. The
alternative, a host check, would synchronise the GPU at every step after an optimizer update."""
import triton
import triton.language as tl

from .utils import launch, memo, options


@triton.jit
def _any_nonfinite(p_ptr, n, BLOCK: tl.constexpr):
    # 1 if any of the n elements at p_ptr is NaN or +-Inf, else 0
    bad = tl.zeros([BLOCK], tl.int32)
    for i in range(0, n, BLOCK):
        k = i + tl.arange(0, BLOCK)
        v = tl.load(p_ptr + k, mask=k < n, other=0.0)
        bad = tl.maximum(bad, ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32))
    return tl.max(bad, axis=0)


@triton.jit
def _any_nonfinite4(p0, n0, p1, n1, p2, n2, p3, n3, BLOCK: tl.constexpr):
    return tl.maximum(tl.maximum(_any_nonfinite(p0, n0, BLOCK), _any_nonfinite(p1, n1, BLOCK)),
                      tl.maximum(_any_nonfinite(p2, n2, BLOCK), _any_nonfinite(p3, n3, BLOCK)))


@triton.jit
def _poison_logits_kernel(o_ptr, n_o,  # o: (B, C), n_o = B * C
                          w0, w1, w2, w3, b0, b1, b2, b3,  # conv weights (G, 1, k_i), biases (G,)
                          nhw, nhb, nww, nwb, ncw, ncb, qw, kw, vw, qb, kb, vb,  # (C,) each (q/k/v biases: optional)
                          n0, n1, n2, n3, G, C, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    bad = tl.maximum(_any_nonfinite4(w0, n0, w1, n1, w2, n2, w3, n3, BLOCK),
                     _any_nonfinite4(b0, G, b1, G, b2, G, b3, G, BLOCK))
    bad = tl.maximum(bad, tl.maximum(_any_nonfinite4(nhw, C, nhb, C, nww, C, nwb, C, BLOCK),
                                     _any_nonfinite4(ncw, C, ncb, C, qw, C, kw, C, BLOCK)))
    bad = tl.maximum(bad, _any_nonfinite(vw, C, BLOCK))
    if HAS_BIAS:
        bad = tl.maximum(bad, _any_nonfinite4(qb, C, kb, C, vb, C, vb, 0, BLOCK))
    if bad != 0:
        for i in range(0, n_o, BLOCK):
            k = i + tl.arange(0, BLOCK)
            tl.store(o_ptr + k, tl.full([BLOCK], float("nan"), o_ptr.dtype.element_ty), mask=k < n_o)


@memo
def _config(has_bias):
    return (1,), options(BLOCK=1024, num_warps=4, HAS_BIAS=has_bias)


def poison_logits(o, conv_weights, conv_biases, norms, qkv_weights, qkv_biases):
    """o made NaN in place if any parameter holds a NaN or an Inf."""
    has_bias = qkv_biases[0] is not None
    grid, opts = _config(has_bias)
    biases = qkv_biases if has_bias else qkv_weights  # placeholders, never read
    launch(_poison_logits_kernel, grid, opts, o, o.numel(), *conv_weights, *conv_biases,
           *[t for pair in norms for t in pair], *qkv_weights, *biases, *[w.numel() for w in conv_weights],
           conv_biases[0].shape[0], o.shape[1])
