"""The Triton provider's forward (DESIGN.md section 2): five launches, one per pass, in order; for
small maps F1-F3 are one launch (group_forward.py). Parameters holding NaN or Inf take the eager
module's op sequence instead (see _eager)."""
from typing import Optional

from torch import Tensor

from ...function import parameters_finite
from ...reference import forward_parts
from ...schema import op_tensors
from ..library import acc_dtype
from .apply_gates import apply_gates
from .channel_attention import channel_attention
from .gated_pool import gated_pool
from .group_forward import group_forward, plan
from .pool import pool
from .spatial_gate import spatial_gate
from .utils import alloc_like


def _eager(x, conv_w, conv_b, norms, qkv_w, qkv_b, head_num, kh, kw, softmax):
    """The eager module's own op sequence (reference.forward_parts) in x's dtype, as the eager
    module converted to it would run it, with the outputs of the fused forward: where NaN and Inf
    go depends on how each op is written (and on fp16's range), and for non-finite parameters they
    must go where the eager module's do."""
    acc = acc_dtype(x.dtype)

    def as_x(ts):
        return [None if t is None else t.to(x.dtype) for t in ts]

    global_pool = (kh, kw) == tuple(x.shape[2:])
    a_h, a_w, _, y, o, out = forward_parts(
        x, as_x(conv_w), as_x(conv_b), *[as_x(n) for n in norms], as_x(qkv_w), as_x(qkv_b), head_num,
        -1 if global_pool else kh, "avg_pool", "softmax" if softmax else "sigmoid")
    xa = x.to(acc)
    return [alloc_like(x).copy_(out), xa.sum(3), xa.sum(2)[None], a_h.to(acc), a_w.to(acc), y.to(acc), o.to(acc)]


def forward(x: Tensor, conv_weights: list[Tensor], conv_biases: list[Tensor], norm_h_weight: Tensor,
            norm_h_bias: Tensor, norm_w_weight: Tensor, norm_w_bias: Tensor, norm_c_weight: Tensor, norm_c_bias: Tensor,
            q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Optional[Tensor], k_bias: Optional[Tensor],
            v_bias: Optional[Tensor], head_num: int, kh: int, kw: int, softmax: bool, eps: float) -> list[Tensor]:
    """The op scsa_triton::forward (schema.SCHEMAS): [out, p_h, p_w, a_h, a_w, Y, o]."""
    norms = ((norm_h_weight, norm_h_bias), (norm_w_weight, norm_w_bias), (norm_c_weight, norm_c_bias))
    qkv_weights, qkv_biases = (q_weight, k_weight, v_weight), (q_bias, k_bias, v_bias)
    # In schema.OP_ORDER, as the backward checks them: parameters_finite caches its answer per
    # list, and a list in another order would be checked (a GPU sync) again on every call.
    params = op_tensors(conv_weights, conv_biases, *norms[0], *norms[1], *norms[2], *qkv_weights, *qkv_biases)
    if not parameters_finite(params):
        return _eager(x, conv_weights, conv_biases, norms, qkv_weights, qkv_biases, head_num, kh, kw, softmax)
    kernel_sizes = tuple([w.shape[-1] for w in conv_weights])
    acc = acc_dtype(x.dtype)
    group_plan = plan(x, (kh, kw), acc, kernel_sizes, softmax)
    if group_plan is not None:
        ph, pw, ah, aw, y = group_forward(x, acc, group_plan, conv_weights, conv_biases, norms[0], norms[1], (kh, kw),
                                          eps)
    else:
        ph, pw = pool(x, acc)
        ah, aw = spatial_gate(ph, pw, conv_weights, conv_biases, norms[0], norms[1], kernel_sizes, softmax, eps)
        y = gated_pool(x, ah, aw, (kh, kw))
    o = channel_attention(y, norms[2], qkv_weights, qkv_biases, head_num, eps)
    return [apply_gates(x, ah, aw, o, softmax), ph, pw, ah, aw, y, o]
