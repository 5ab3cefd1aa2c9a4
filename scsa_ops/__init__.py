"""scsa_ops: fused kernels for SCSA (Spatial and Channel Synergistic Attention)."""
from . import backends, functional, reference
from .convert import convert, revert
from .module import SCSA
from .ops import cpp as _cpp
from .ops.cpp import capability as cpu_capability

# The scsa_cpp ops exist once scsa_ops is imported (if the extension is built; nothing is compiled
# here): torch.jit.load and AOTInductor packages of fused models look them up by name.
_cpp.load(jit=False)
backends.warn_if_triton_too_old()

__all__ = ["SCSA", "convert", "cpu_capability", "functional", "reference", "revert"]
__version__ = "0.1.0"
