"""scsa_ops: fused kernels for SCSA (Spatial and Channel Synergistic Attention)."""
from . import functional, reference
from .convert import convert, revert
from .module import SCSA

__all__ = ["SCSA", "convert", "functional", "reference", "revert"]
__version__ = "0.1.0"
