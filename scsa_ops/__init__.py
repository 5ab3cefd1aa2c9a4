"""scsa_ops: fused kernels for SCSA (Spatial and Channel Synergistic Attention)."""
from . import reference
from .function import Config, SCSAFunction, fused_scsa
from .module import SCSA

__all__ = ["SCSA", "SCSAFunction", "Config", "fused_scsa", "reference"]
__version__ = "0.1.0"
