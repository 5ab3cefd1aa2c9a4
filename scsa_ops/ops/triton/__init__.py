"""The Triton provider: the ops scsa_triton::{forward (five launches), backward (five launches),
gate_grads, input_grad}
(registered in ..library), and `fits` (the widest row one program holds). Each pass's kernel lives
in the file named after it."""
from ..library import Provider, register_triton_ops
from .apply_gates import input_grad
from .backward import backward
from .forward import forward
from .gate_grads import gate_grads
from .utils import INTERPRET, fits

register_triton_ops(INTERPRET, forward, backward, gate_grads, input_grad)
provider = Provider("scsa_triton", fits, (forward, backward))

__all__ = ["provider"]
