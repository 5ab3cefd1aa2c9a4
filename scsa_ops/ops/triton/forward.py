"""The Triton provider's forward (DESIGN.md section 2): five launches, one per pass, in order; for
small maps F1-F3 are one launch (group_forward.py). A sixth, small one after F4 makes the logits NaN
if a parameter holds a NaN or an Inf (nonfinite.py), decided on the device."""
from typing import Optional

from torch import Tensor

from ..library import acc_dtype
from .apply_gates import apply_gates
from .channel_attention import channel_attention
from .gated_pool import gated_pool
from .group_forward import group_forward, plan
from .nonfinite import poison_logits
from .pool import pool
from .spatial_gate import spatial_gate


def forward(x: Tensor, conv_weights: list[Tensor], conv_biases: list[Tensor], norm_h_weight: Tensor,
            norm_h_bias: Tensor, norm_w_weight: Tensor, norm_w_bias: Tensor, norm_c_weight: Tensor, norm_c_bias: Tensor,
            q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Optional[Tensor], k_bias: Optional[Tensor],
            v_bias: Optional[Tensor], head_num: int, kh: int, kw: int, softmax: bool, eps: float) -> list[Tensor]:
    """The op scsa_triton::forward (schema.SCHEMAS): [out, p_h, p_w, a_h, a_w, Y, o]."""
    norms = ((norm_h_weight, norm_h_bias), (norm_w_weight, norm_w_bias), (norm_c_weight, norm_c_bias))
    qkv_weights, qkv_biases = (q_weight, k_weight, v_weight), (q_bias, k_bias, v_bias)
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
    poison_logits(o, conv_weights, conv_biases, norms, qkv_weights, qkv_biases)
    return [apply_gates(x, ah, aw, o, softmax), ph, pw, ah, aw, y, o]
