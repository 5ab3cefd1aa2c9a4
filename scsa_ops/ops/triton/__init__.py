"""The Triton provider: one launcher per pass of DESIGN.md section 2-3, in pass order."""
from .apply_gates import apply_gates, input_grad
from .channel_attention import channel_attention
from .gate_grads import gate_grads
from .gated_pool import gated_pool
from .pool import pool
from .spatial_gate import spatial_gate
from .utils import fits

__all__ = ["pool", "spatial_gate", "gated_pool", "channel_attention", "apply_gates", "gate_grads",
           "input_grad", "fits"]
