"""scsa_ops: fused kernels for SCSA (Spatial and Channel Synergistic Attention)."""
from . import reference
from .convert import convert, revert
from .function import Config, SCSAFunction, fused_scsa
from .module import SCSA

__all__ = ["SCSA", "SCSAFunction", "Config", "convert", "fused_scsa", "reference", "revert"]
__version__ = "0.1.0"
