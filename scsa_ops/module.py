"""`scsa_ops.SCSA`: the reference module's parameters and state dict, dispatched to a fused path.

Fused (Triton on CUDA, the C++ path on CPU): avg_pool or global pooling, sigmoid or softmax
gates, any head_num / kernel sizes / qkv_bias, attention dropout in eval mode; Triton rows up to
2048 padded elements wide. Everything else runs the eager math with the same parameters:
down_sample_mode='max_pool', attention dropout while training, an empty batch, wider rows.
"""
from typing import Optional, Sequence

import torch

from . import backends
from .function import PARAM_NAMES, Config, fused_scsa
from .reference import SCSA as ReferenceSCSA
from .reference import check_input, window_of

_PARAM_PATHS = [name.split(".") for name in PARAM_NAMES]
_QKV_BIASES = [PARAM_NAMES.index(f"{m}.bias") for m in "qkv"]


class SCSA(ReferenceSCSA):
    """Drop-in SCSA: official constructor plus `backend` ('auto' | 'triton' | 'cpp' | 'eager')."""

    def __init__(self, dim: int, head_num: int = 1, window_size: int = 7,
                 group_kernel_sizes: Sequence[int] = (3, 5, 7, 9), qkv_bias: bool = False,
                 fuse_bn: bool = False, norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None,
                 down_sample_mode: str = "avg_pool", attn_drop_ratio: float = 0.0,
                 gate_layer: str = "sigmoid", backend: str = "auto"):
        super().__init__(dim, head_num, window_size, group_kernel_sizes, qkv_bias, fuse_bn, norm_cfg,
                         act_cfg, down_sample_mode, attn_drop_ratio, gate_layer)
        self.backend = backends.check_backend(backend)
        self.config = Config(head_num, window_size, self.group_kernel_sizes, gate_layer)

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def fusable(self):
        """Whether this configuration, in the current train/eval mode, has a fused path."""
        return ((self.down_sample_mode == "avg_pool" or self.window_size == -1)
                and not (self.training and self.attn_drop_ratio > 0))

    def forward(self, x):
        check_input(self, x)
        provider = backends.resolve(self.backend, x.device, self.fusable())
        window_w = window_of(self.window_size, *x.shape[2:])[1]
        if provider is None or x.shape[0] == 0 or not provider.fits(x.shape[3], window_w):
            return self.eager_forward(x)
        params = self.state_dict_params()
        check_params(params, x)
        if any(t is None for t in params):  # not `None in params`: that compares tensors (200 us)
            params = _fill_missing(params, self.dim)
        return fused_scsa(x, params, self.config, provider)

    def state_dict_params(self):
        # Plain dict lookups, not named_parameters() or nn.Module.__getattr__: this runs on every call.
        modules = self._modules
        return [modules[module]._parameters.get(attr) for module, attr in _PARAM_PATHS]


def check_params(params, x):
    """Every parameter on x's device and floating point, before a kernel reads it: the input check
    looks at one parameter only, and a parameter left on the meta device (a half-loaded module)
    would otherwise reach a kernel as memory nobody wrote."""
    for name, t in zip(PARAM_NAMES, params):
        if t is None:
            continue
        if t.device != x.device:
            hint = (" (a module built on the meta device needs every parameter loaded, e.g. load_state_dict(sd, "
                    "assign=True) with all keys)" if t.is_meta else "")
            raise ValueError(f"SCSA: parameter {name!r} is on {t.device} but the input is on {x.device}{hint}")
        if not t.is_floating_point():
            raise TypeError(f"SCSA: parameter {name!r} must be floating point, got {t.dtype}")


def _fill_missing(params, dim):
    """A bias removed with register_parameter(name, None) acts as zero and a GroupNorm without its
    affine weight as one, as in the eager ops; the q/k/v biases may be absent all together
    (qkv_bias=False). A convolution without its weight has no such meaning."""
    like = next(t for t in params if t is not None)
    no_qkv_bias = all(params[i] is None for i in _QKV_BIASES)
    filled = []
    for i, (name, t) in enumerate(zip(PARAM_NAMES, params)):
        if t is None and not (no_qkv_bias and i in _QKV_BIASES):
            if name.endswith(".weight") and not name.startswith("norm"):
                raise ValueError(f"SCSA: parameter {name!r} is None; a convolution needs its weight")
            size = dim // 4 if "dwc" in name else dim
            t = (torch.ones if name.endswith(".weight") else torch.zeros)(size, dtype=like.dtype, device=like.device)
        filled.append(t)
    return filled
