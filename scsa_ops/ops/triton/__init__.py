"""The Triton provider: `forward` (five launches), the backward's `gate_grads` and `input_grad`,
and `fits` (the widest row one program holds). Each pass's kernel lives in the file named after it."""
from .apply_gates import input_grad
from .forward import forward
from .gate_grads import gate_grads
from .utils import fits

__all__ = ["forward", "gate_grads", "input_grad", "fits"]
