"""The Triton provider's forward (DESIGN.md section 2): five launches, one per pass, in order."""
from typing import Optional

from torch import Tensor

from ..library import acc_dtype
from .apply_gates import apply_gates
from .channel_attention import channel_attention
from .gated_pool import gated_pool
from .pool import pool
from .spatial_gate import spatial_gate


def forward(x: Tensor, conv_w: list[Tensor], conv_b: list[Tensor], norm_h_w: Tensor, norm_h_b: Tensor,
            norm_w_w: Tensor, norm_w_b: Tensor, norm_w: Tensor, norm_b: Tensor, q_w: Tensor, k_w: Tensor,
            v_w: Tensor, q_b: Optional[Tensor], k_b: Optional[Tensor], v_b: Optional[Tensor], head_num: int,
            kh: int, kw: int, softmax: bool, eps: float) -> list[Tensor]:
    """The op scsa_triton::forward (schema of scsa_cpp::forward): [out, p_h, p_w, a_h, a_w, Y, o]."""
    kernel_sizes = [w.shape[-1] for w in conv_w]
    ph, pw = pool(x, acc_dtype(x.dtype))
    ah, aw = spatial_gate(ph, pw, conv_w, conv_b, (norm_h_w, norm_h_b), (norm_w_w, norm_w_b), kernel_sizes,
                          softmax, eps)
    y = gated_pool(x, ah, aw, (kh, kw))
    o = channel_attention(y, (norm_w, norm_b), (q_w, k_w, v_w), (q_b, k_b, v_b), head_num, eps)
    return [apply_gates(x, ah, aw, o, softmax), ph, pw, ah, aw, y, o]
