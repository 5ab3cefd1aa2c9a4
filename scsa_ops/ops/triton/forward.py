"""The Triton provider's forward (DESIGN.md section 2): five launches, one per pass, in order."""
from ..library import acc_dtype
from .apply_gates import apply_gates
from .channel_attention import channel_attention
from .gated_pool import gated_pool
from .pool import pool
from .spatial_gate import spatial_gate


def forward(x, p, cfg, window, eps):
    """(out, p_h, p_w, a_h, a_w, Y, o) for scsa_ops.function.SCSAFunction; p: function.Params."""
    softmax = cfg.gate == "softmax"
    ph, pw = pool(x, acc_dtype(x.dtype))
    ah, aw = spatial_gate(ph, pw, p.conv_w, p.conv_b, p.norm_h, p.norm_w, cfg.kernel_sizes, softmax, eps)
    y = gated_pool(x, ah, aw, window)
    o = channel_attention(y, p.norm, p.qkv_w, p.qkv_b, cfg.head_num, eps)
    return apply_gates(x, ah, aw, o, softmax), ph, pw, ah, aw, y, o
