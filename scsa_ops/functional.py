"""`scsa_ops.functional.scsa`: SCSA as a function of its input and a mapping of parameters, for
code that holds the parameters itself (torch.func.functional_call, weight tying, hypernetworks).
scsa_ops.SCSA calls the same dispatch (`run`) with its own parameters."""
from typing import Mapping, Optional

import torch

from . import backends
from .autograd import Config, eager_math, fused_scsa
from .reference import check_config, check_input, window_of
from .schema import CONV_WEIGHTS, OPTIONAL, PARAM_NAMES, QKV_BIASES, QKV_WEIGHTS, indices, shape

_PARAM_PATHS = [name.split(".") for name in PARAM_NAMES]
_QKV_BIASES = indices(QKV_BIASES)


def scsa(input: torch.Tensor, params: Mapping[str, Optional[torch.Tensor]], *, head_num: int = 1,
         window_size: int = 7, gate_layer: str = "sigmoid", backend: str = "auto") -> torch.Tensor:
    """SCSA of `input` (B, C, H, W) with average pooling (window_size=-1: global) and no attention
    dropout. `params` maps the official state-dict names ('local_dwc.weight', ..., 'v.bias') to
    tensors; the q/k/v biases may be left out, a bias may be None (zero, as in the eager ops), and
    the kernel sizes are read from the conv weights. Differentiable w.r.t. input and every tensor of
    params; `backend` as in scsa_ops.SCSA."""
    backends.check_backend(backend)
    unknown = sorted(set(params) - set(PARAM_NAMES))
    missing = [n for n in PARAM_NAMES if n not in params and n not in OPTIONAL]
    if unknown or missing:
        raise ValueError(f"SCSA: params must hold the official state-dict names; unknown {unknown}, missing {missing}")
    plist = [params.get(n) for n in PARAM_NAMES]
    weight = params["norm.weight"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"SCSA: params['norm.weight'] must be a 1-D tensor of the channels, got {weight!r:.80}")
    dim = weight.shape[0]
    kernel_sizes = [params[n].shape[-1] for n in CONV_WEIGHTS]
    _, head_num, window_size, _ = check_config(dim, head_num, window_size, kernel_sizes, "avg_pool", 0.0, gate_layer)
    for name, t in zip(PARAM_NAMES, plist):
        expected = shape(name, dim, kernel_sizes)
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(f"SCSA: params[{name!r}] must have shape {expected}, got {tuple(t.shape)}")
    check_input(input, dim, window_size, weight.device)
    return run(input, plist, Config(head_num, window_size, gate_layer), backend)


def run(x, params, cfg: Config, backend):
    """Checked input x, the parameters in PARAM_NAMES order: the fused op of `backend` where it
    takes this call, else the reference math on the same parameters."""
    provider = backends.resolve(backend, x.device, True)
    window_w = window_of(cfg.window_size, *x.shape[2:])[1]
    if provider is None or x.shape[0] == 0 or not provider.fits(x.shape[3], window_w) or _onnx_export():
        return eager_math(x, params, cfg)
    missing = check_params(params, x)
    if missing and missing != _QKV_BIASES:  # the q/k/v biases the ops take as absent, or something to fill
        params = _fill_missing(params, x.shape[1])
    return fused_scsa(x, params, cfg, provider)


def _onnx_export():
    """ONNX has no fused op: both exporters (dynamo=False, which traces with TorchScript, and the
    dynamo one, where torch >= 2.7 sets this flag too) record the reference math in standard ops."""
    return torch.onnx.is_in_onnx_export()


def module_params(module):
    """A module's parameters in PARAM_NAMES order. Plain dict lookups, not named_parameters() or
    nn.Module.__getattr__: this runs on every call."""
    modules = module._modules
    return [modules[m]._parameters.get(attr) for m, attr in _PARAM_PATHS]


def check_params(params, x):
    """Every parameter on x's device and floating point, before a kernel reads it: the input check
    looks at one parameter only, and a parameter left on the meta device (a half-loaded module)
    would otherwise reach a kernel as memory nobody wrote. Returns the indices of the absent ones."""
    device, missing = x.device, ()
    for i, t in enumerate(params):
        if t is None:
            missing += (i,)
        elif t.device != device or not t.dtype.is_floating_point:
            _raise_param_error(PARAM_NAMES[i], t, x)
    return missing


def _raise_param_error(name, t, x):
    if t.device != x.device:
        hint = (" (a module built on the meta device needs every parameter loaded, e.g. load_state_dict(sd, "
                "assign=True) with all keys)" if t.is_meta else "")
        raise ValueError(f"SCSA: parameter {name!r} is on {t.device} but the input is on {x.device}{hint}")
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
            if name in CONV_WEIGHTS or name in QKV_WEIGHTS:
                raise ValueError(f"SCSA: parameter {name!r} is None; a convolution needs its weight")
            fill = torch.ones if name.endswith(".weight") else torch.zeros  # a GroupNorm weight, or a bias
            t = fill(shape(name, dim, None), dtype=like.dtype, device=like.device)
        filled.append(t)
    return filled
