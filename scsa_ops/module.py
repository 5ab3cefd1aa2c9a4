"""`scsa_ops.SCSA`: the reference module's parameters and state dict, dispatched to a fused path.

Fused (Triton on CUDA, the C++ path on CPU): avg_pool or global pooling, sigmoid or softmax
gates, any head_num / kernel sizes / qkv_bias, attention dropout in eval mode; Triton rows up to
2048 padded elements wide. Everything else runs the eager math with the same parameters:
down_sample_mode='max_pool', attention dropout while training, an empty batch, wider rows.
"""
from typing import Optional, Sequence

from . import backends, functional
from .autograd import Config
from .reference import SCSA as ReferenceSCSA
from .reference import check_input


class SCSA(ReferenceSCSA):
    """Drop-in SCSA: official constructor plus `backend` ('auto' | 'triton' | 'cpp' | 'eager') and
    torch.nn's factory keywords `device` and `dtype`."""

    def __init__(self, dim: int, head_num: int = 1, window_size: int = 7,
                 group_kernel_sizes: Sequence[int] = (3, 5, 7, 9), qkv_bias: bool = False,
                 fuse_bn: bool = False, norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None,
                 down_sample_mode: str = "avg_pool", attn_drop_ratio: float = 0.0,
                 gate_layer: str = "sigmoid", backend: str = "auto", *, device=None, dtype=None):
        super().__init__(dim, head_num, window_size, group_kernel_sizes, qkv_bias, fuse_bn, norm_cfg,
                         act_cfg, down_sample_mode, attn_drop_ratio, gate_layer, device=device, dtype=dtype)
        self.backend = backends.check_backend(backend)
        self.config = Config(self.head_num, self.window_size, gate_layer)

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def fusable(self):
        """Whether this configuration, in the current train/eval mode, has a fused path."""
        return ((self.down_sample_mode == "avg_pool" or self.window_size == -1)
                and not (self.training and self.attn_drop_ratio > 0))

    def forward(self, x):
        check_input(x, self.dim, self.window_size, self.param_device())
        if self.fusable():
            return functional.run(x, self.state_dict_params(), self.config, self.backend)
        backends.env_backend()  # the environment variable is checked on every call, fused or not
        return self.eager_forward(x)

    def state_dict_params(self):
        """The parameters in schema.PARAM_NAMES order (None where a module has none)."""
        return functional.module_params(self)
