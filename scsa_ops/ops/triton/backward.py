"""The Triton provider's backward (DESIGN.md section 3): five launches and no PyTorch compute op
between them (allocations only): gate_grads (first full-size pass), the channel attention's
backward with GroupNorm(1) and q/k/v, the spatial gates' backward, the parameter-gradient
reduction, and input_grad (second full-size pass)."""
from typing import Optional

from torch import Tensor

from .apply_gates import input_grad as input_grad_pass
from .channel_attention import channel_attention_backward
from .gate_grads import gate_grads
from .param_grads import param_grads
from .spatial_gate import spatial_gate_backward
from .utils import alloc, dense, memo


@memo
def _partials(B, C, kernel_sizes, qkv_bias):
    """(one branch's conv partials, the allocations of the per-sample partials and the gradients).
    A sample's partials: each branch's conv gradients (summed in param_grads), norm_h, norm_w,
    norm_c, q/k/v weights, q/k/v biases."""
    conv_size = C // 4 * (sum(kernel_sizes) + 4)
    rest = C * (12 if qkv_bias else 9)
    return conv_size, dense(B, 2 * conv_size + rest), dense(conv_size + rest)


def backward(g: Tensor, x: Tensor, conv_weights: list[Tensor], conv_biases: list[Tensor], norm_h_weight: Tensor,
             norm_h_bias: Tensor, norm_w_weight: Tensor, norm_w_bias: Tensor, norm_c_weight: Tensor,
             norm_c_bias: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Optional[Tensor],
             k_bias: Optional[Tensor], v_bias: Optional[Tensor], ph: Tensor, pw: Tensor, ah: Tensor, aw: Tensor,
             y: Tensor, o: Tensor, head_num: int, kh: int, kw: int, softmax: bool, eps: float,
             input_grad: bool) -> list[Tensor]:
    """The op scsa_triton::backward (schema.SCHEMAS): [dX (empty unless input_grad), every parameter
    gradient, flat, in schema.PARAM_NAMES order, in the accumulator dtype]."""
    B, C = x.shape[:2]
    acc = ah.dtype
    sums = gate_grads(g, x, ah, aw, kh, kw)
    conv_size, part_spec, grads_spec = _partials(B, C, tuple([w.shape[-1] for w in conv_weights]), q_bias is not None)
    part = alloc(part_spec, acc, x.device)
    dy = channel_attention_backward(y, o, sums[0], ah, (norm_c_weight, norm_c_bias), (q_weight, k_weight, v_weight),
                                    (q_bias, k_bias, v_bias), head_num, (kh, kw), softmax, eps, part,
                                    2 * conv_size + 4 * C)
    dph, dpw = spatial_gate_backward(ph, pw, ah, aw, o, sums, dy, conv_weights, norm_h_weight, norm_w_weight,
                                     conv_biases, (kh, kw), softmax, eps, part, x.dtype)
    grads = param_grads(part, conv_size, alloc(grads_spec, acc, x.device))
    dx = input_grad_pass(g, x, ah, aw, o, dy, dph, dpw, kh, kw, softmax) if input_grad else x.new_empty(0)
    return [dx, grads]

