"""Pure-PyTorch SCSA: the oracle every fused path is tested against, and the eager backend.

The math follows DESIGN.md section 1 (the official HZAI-ZJNU/SCSA module); tests pin it to float64
vectors produced by the official code. The two small sub-graphs (`spatial_gate`,
`channel_attention_logits`) are also what the fused backward differentiates with autograd on
recomputed small tensors, so they are written as plain functions of tensors.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schema import CONVS

GATES = ("sigmoid", "softmax")
DOWN_SAMPLE_MODES = ("avg_pool", "max_pool")
EPS = 1e-5


def _group_norm(x, groups, weight, bias):
    # torch.group_norm, not F.group_norm: the latter's "more than one value per channel" check (never
    # false here: C >= 4) makes torch.export guard on the pooled map's size and reject H' = 1.
    return torch.group_norm(x, groups, weight, bias, EPS, torch.backends.cudnn.enabled)


def spatial_gate(p, conv_weights, conv_biases, norm_weight, norm_bias, gate):
    """(B, C, L) row or column means -> (B, C, L) gate: 4 depthwise convs, GroupNorm(4), gate."""
    groups = p.chunk(4, dim=1)
    # int(): the kernel size and the channels are static; torch 2.6's ONNX tracer (dynamo=False)
    # would otherwise record the sizes as tensors, which conv1d takes for no padding at all.
    z = torch.cat([F.conv1d(pg, w, b, padding=int(w.shape[-1]) // 2, groups=int(pg.shape[1]))
                   for pg, w, b in zip(groups, conv_weights, conv_biases)], dim=1)
    z = _group_norm(z, 4, norm_weight, norm_bias)
    return z.softmax(dim=2) if gate == "softmax" else z.sigmoid()


def channel_attention_logits(y, norm_weight, norm_bias, qkv_weights, qkv_biases, head_num,
                             attn_drop=0.0, training=False):
    """(B, C, H', W') pooled map -> (B, C) pre-gate logits `o` (DESIGN.md steps 7-10).

    Uses mean_n(P V) = P @ mean_n(V), exact in real arithmetic (also with dropout on P)."""
    b, c = y.shape[:2]
    y = _group_norm(y, 1, norm_weight, norm_bias).flatten(2)
    q, k, v = (y * w.view(1, c, 1) + (0 if bias is None else bias.view(1, c, 1))
               for w, bias in zip(qkv_weights, qkv_biases))
    d, n = c // head_num, y.shape[2]
    q, k = q.view(b, head_num, d, n), k.view(b, head_num, d, n)
    attn = (q @ k.transpose(-2, -1) * d ** -0.5).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    vbar = v.mean(dim=-1).view(b, head_num, d, 1)
    return (attn @ vbar).view(b, c)


def channel_gate(o, gate):
    return o.softmax(dim=1) if gate == "softmax" else o.sigmoid()


def window_of(window_size, h, w):
    """Pooling window (kh, kw): global pooling is a window the size of the map."""
    return (h, w) if window_size == -1 else (window_size, window_size)


def _as_int(value):
    """Python, numpy and torch integers alike (sizes often come from configs or arrays), as the
    official module takes them; None for anything else."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_config(dim, head_num, window_size, group_kernel_sizes, down_sample_mode,
                 attn_drop_ratio, gate_layer):
    """The validated (dim, head_num, window_size, group_kernel_sizes) as Python ints; messages
    print each argument as it was given."""
    d, h, win = _as_int(dim), _as_int(head_num), _as_int(window_size)
    if d is None or d <= 0 or d % 4:
        raise ValueError(f"SCSA: dim must be a positive multiple of 4 (four channel groups), got {dim!r}")
    if h is None or h <= 0:
        raise ValueError(f"SCSA: head_num must be a positive int, got {head_num!r}")
    if d % h:
        raise ValueError(f"SCSA: dim={dim!r} must be divisible by head_num={head_num!r}")
    if win is None or (win != -1 and win < 1):
        raise ValueError(f"SCSA: window_size must be a positive int or -1 (global), got {window_size!r}")
    ks = tuple(_as_int(k) for k in group_kernel_sizes)
    if len(ks) != 4 or any(k is None or k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"SCSA: group_kernel_sizes must be four odd positive ints, got {group_kernel_sizes!r}")
    # window_size=-1 is global average pooling whatever the mode, as in the official module.
    if win != -1 and down_sample_mode == "recombination":
        raise ValueError("SCSA: down_sample_mode='recombination' is not supported: the official module "
                         "calls a space_to_chans method it never defines; use 'avg_pool' or 'max_pool' "
                         "(or window_size=-1, global pooling)")
    if win != -1 and down_sample_mode not in DOWN_SAMPLE_MODES:
        raise ValueError(f"SCSA: unknown down_sample_mode {down_sample_mode!r}; expected one of {DOWN_SAMPLE_MODES}")
    if gate_layer not in GATES:
        raise ValueError(f"SCSA: unknown gate_layer {gate_layer!r}; expected one of {GATES}")
    if not 0.0 <= attn_drop_ratio < 1.0:
        raise ValueError(f"SCSA: attn_drop_ratio must be in [0, 1), got {attn_drop_ratio}")
    return d, h, win, ks


def check_input(x, dim, window_size, param_device):
    """Shape/dtype/device checks shared by every backend, raised before any kernel runs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"SCSA: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"SCSA: expected a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"SCSA: expected a floating-point input (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.shape[1] != dim:
        raise ValueError(f"SCSA: input has {x.shape[1]} channels but the module was built with dim={dim} "
                         f"(shape {tuple(x.shape)})")
    h, w = x.shape[2:]
    if window_size != -1 and (h < window_size or w < window_size):
        raise ValueError(f"SCSA: input spatial size {h}x{w} (shape {tuple(x.shape)}) is smaller than "
                         f"window_size={window_size}; use a smaller window or window_size=-1")
    # nn.Module.to moves every parameter together: one of them stands for all (this runs per call;
    # the fused paths check each parameter before a kernel reads it).
    if param_device != x.device:
        raise ValueError(f"SCSA: the parameters are on {param_device} but the input is on {x.device}")


class SCSA(nn.Module):
    """Reference SCSA with the official constructor, options and state-dict names.

    `fuse_bn`, `norm_cfg` and `act_cfg` are accepted (and unused, as in the official code) so that
    official configs construct unchanged; `device` and `dtype` are torch.nn's factory keywords (timm
    passes them), where and in what dtype the parameters are created."""

    def __init__(self, dim: int, head_num: int = 1, window_size: int = 7,
                 group_kernel_sizes: Sequence[int] = (3, 5, 7, 9), qkv_bias: bool = False,
                 fuse_bn: bool = False, norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None,
                 down_sample_mode: str = "avg_pool", attn_drop_ratio: float = 0.0,
                 gate_layer: str = "sigmoid", *, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)  # where and in what dtype the parameters are made
        dim, head_num, window_size, ks = check_config(dim, head_num, window_size, group_kernel_sizes,
                                                      down_sample_mode, attn_drop_ratio, gate_layer)
        self.dim, self.head_num, self.head_dim = dim, head_num, dim // head_num
        self.scaler = self.head_dim ** -0.5
        self.group_kernel_sizes = ks
        self.window_size = window_size
        self.qkv_bias = qkv_bias
        self.fuse_bn = fuse_bn
        self.down_sample_mode = down_sample_mode
        self.gate_layer = gate_layer
        self.group_chans = g = dim // 4
        for name, k in zip(CONVS, ks):
            setattr(self, name, nn.Conv1d(g, g, kernel_size=k, padding=k // 2, groups=g, **factory))
        # The official class's parameter-free submodules, in its order (state dict unchanged): code
        # written for it reads them. gate_layer chooses the gates; attn_drop holds the dropout rate.
        self.sa_gate = nn.Softmax(dim=2) if gate_layer == "softmax" else nn.Sigmoid()
        self.norm_h = nn.GroupNorm(4, dim, **factory)
        self.norm_w = nn.GroupNorm(4, dim, **factory)
        self.norm = nn.GroupNorm(1, dim, **factory)
        self.q = nn.Conv2d(dim, dim, 1, bias=qkv_bias, groups=dim, **factory)
        self.k = nn.Conv2d(dim, dim, 1, bias=qkv_bias, groups=dim, **factory)
        self.v = nn.Conv2d(dim, dim, 1, bias=qkv_bias, groups=dim, **factory)
        self.attn_drop = nn.Dropout(attn_drop_ratio)
        self.ca_gate = nn.Softmax(dim=1) if gate_layer == "softmax" else nn.Sigmoid()

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say what works instead.
        raise RuntimeError("SCSA: torch.jit.script cannot compile SCSA (its forward dispatches in Python); use "
                           "torch.jit.trace, which records the fused op (scsa_cpp::forward), or torch.export")

    @property
    def attn_drop_ratio(self):
        """The attention dropout rate: `attn_drop.p`, so that `m.attn_drop.p = 0.2` takes effect."""
        return self.attn_drop.p

    @attn_drop_ratio.setter
    def attn_drop_ratio(self, p):
        self.attn_drop.p = p

    def extra_repr(self):
        return (f"dim={self.dim}, head_num={self.head_num}, window_size={self.window_size}, "
                f"group_kernel_sizes={self.group_kernel_sizes}, qkv_bias={self.qkv_bias}, "
                f"down_sample_mode={self.down_sample_mode!r}, attn_drop_ratio={self.attn_drop_ratio}, "
                f"gate_layer={self.gate_layer!r}")

    def convs(self):
        return [getattr(self, n) for n in CONVS]

    def param_device(self):
        """Where the parameters are (nn.Module.to moves them together): the GroupNorm's weight, or
        any parameter where that was removed (register_parameter(name, None): a weight of one)."""
        w = self.norm.weight
        return next(self.parameters()).device if w is None else w.device

    def forward(self, x):
        check_input(x, self.dim, self.window_size, self.param_device())
        return self.eager_forward(x)

    def eager_forward(self, x):
        convs = self.convs()
        return forward_parts(
            x, [m.weight for m in convs], [m.bias for m in convs], (self.norm_h.weight, self.norm_h.bias),
            (self.norm_w.weight, self.norm_w.bias), (self.norm.weight, self.norm.bias),
            (self.q.weight, self.k.weight, self.v.weight), (self.q.bias, self.k.bias, self.v.bias), self.head_num,
            self.window_size, self.down_sample_mode, self.gate_layer, self.attn_drop_ratio, self.training)[-1]


def forward_parts(x, conv_weights, conv_biases, norm_h, norm_w, norm, qkv_weights, qkv_biases, head_num,
                  window_size, down_sample_mode, gate, attn_drop=0.0, training=False):
    """The eager forward, step by step: (a_h, a_w, Xs, Y, o, out); the fused paths' fallback
    (scsa_ops.autograd.eager_math) for calls no fused op takes."""
    a_h = spatial_gate(x.mean(dim=3), conv_weights, conv_biases, *norm_h, gate)
    a_w = spatial_gate(x.mean(dim=2), conv_weights, conv_biases, *norm_w, gate)
    xs = x * a_h.unsqueeze(3) * a_w.unsqueeze(2)
    if window_size == -1:
        y = xs.mean(dim=(2, 3), keepdim=True)
    elif down_sample_mode == "max_pool":
        y = F.max_pool2d(xs, window_size, window_size)
    else:
        y = F.avg_pool2d(xs, window_size, window_size)
    o = channel_attention_logits(y, *norm, qkv_weights, qkv_biases, head_num, attn_drop, training)
    a_c = channel_gate(o, gate)
    return a_h, a_w, xs, y, o, xs * a_c.view(*a_c.shape, 1, 1)
