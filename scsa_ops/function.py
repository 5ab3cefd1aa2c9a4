"""The one autograd Function of the fused SCSA, shared by every provider (Triton, C++).

A provider is a namespace of launchers, one per full-size pass of DESIGN.md sections 2-3:
`pool, spatial_gate, gated_pool, channel_attention, apply_gates` (forward) and
`gate_grads, input_grad` (backward). This file only orchestrates them; the small graphs of the
backward (spatial gate, channel attention) are differentiated by autograd on recomputed small
tensors, which also yields every parameter gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .reference import EPS, channel_attention_logits, channel_gate, spatial_gate, window_of

# Order of the parameter tensors passed to SCSAFunction (qkv biases may be None).
PARAM_NAMES = (
    "local_dwc.weight", "local_dwc.bias", "global_dwc_s.weight", "global_dwc_s.bias",
    "global_dwc_m.weight", "global_dwc_m.bias", "global_dwc_l.weight", "global_dwc_l.bias",
    "norm_h.weight", "norm_h.bias", "norm_w.weight", "norm_w.bias", "norm.weight", "norm.bias",
    "q.weight", "k.weight", "v.weight", "q.bias", "k.bias", "v.bias",
)


@dataclass(frozen=True)
class Config:
    head_num: int
    window_size: int
    kernel_sizes: Tuple[int, int, int, int]
    gate: str


class _Params:
    def __init__(self, params):
        self.conv_w, self.conv_b = list(params[0:8:2]), list(params[1:8:2])
        self.norm_h, self.norm_w, self.norm = params[8:10], params[10:12], params[12:14]
        self.qkv_w, self.qkv_b = params[14:17], params[17:20]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class SCSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, provider, cfg: Config, *params):
        p = _Params(params)
        softmax = cfg.gate == "softmax"
        window = window_of(cfg.window_size, *x.shape[2:])
        with torch.cuda.device_of(x):
            ph, pw = provider.pool(x, _acc_dtype(x.dtype))
            ah, aw = provider.spatial_gate(ph, pw, p.conv_w, p.conv_b, p.norm_h, p.norm_w,
                                           cfg.kernel_sizes, softmax, EPS)
            y = provider.gated_pool(x, ah, aw, window)
            o = provider.channel_attention(y, p.norm, p.qkv_w, p.qkv_b, cfg.head_num, EPS)
            out = provider.apply_gates(x, ah, aw, o, softmax)
        ctx.provider, ctx.cfg, ctx.window = provider, cfg, window
        ctx.save_for_backward(x, ph, pw, ah, aw, y, o, *params)
        return out

    @staticmethod
    def backward(ctx, g):
        x, ph, pw, ah, aw, y, o, *params = ctx.saved_tensors
        cfg, provider, (kh, kw) = ctx.cfg, ctx.provider, ctx.window
        H, W = x.shape[2:]
        ho, wo = H // kh, W // kw
        with torch.cuda.device_of(x):
            r, s, u, v = provider.gate_grads(g, x, ah, aw, ctx.window)
        acc = ah.dtype
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_() for t in params]
            p = _Params([None if t is None else t.to(acc) for t in leaves])
            y_ = y.detach().requires_grad_()
            a_c = channel_gate(channel_attention_logits(y_, *p.norm, p.qkv_w, p.qkv_b, cfg.head_num), cfg.gate)
            ca_in = [y_, *p.norm, *p.qkv_w, *[t for t in p.qkv_b if t is not None]]
            dy, *d_ca = torch.autograd.grad(a_c, ca_in, (ah * r).sum(-1))
            dy = dy / (kh * kw)
            a_c = a_c.detach()
            dah = a_c[..., None] * r
            dah[:, :, :ho * kh] += (u.unflatten(2, (ho, kh)) * dy.unsqueeze(3)).sum(-1).flatten(2)
            daw = a_c[..., None] * s.sum(2)
            daw[:, :, :wo * kw] += (v.unflatten(3, (wo, kw)) * dy.unsqueeze(4)).sum(2).flatten(2)
            ph_ = (ph / W).requires_grad_()
            pw_ = (pw.sum(0) / H).requires_grad_()
            a_h = spatial_gate(ph_, p.conv_w, p.conv_b, *p.norm_h, cfg.gate)
            a_w = spatial_gate(pw_, p.conv_w, p.conv_b, *p.norm_w, cfg.gate)
            sa_in = [ph_, pw_, *p.conv_w, *p.conv_b, *p.norm_h, *p.norm_w]
            dph, dpw, *d_sa = torch.autograd.grad((a_h, a_w), sa_in, (dah, daw))
        dx = None
        if ctx.needs_input_grad[0]:
            with torch.cuda.device_of(x):
                dx = provider.input_grad(g, x, ah, aw, o, dy, dph / W, dpw / H, ctx.window,
                                         cfg.gate == "softmax")
        # Gradients were taken w.r.t. the fp32/fp64 working copies: return them in each leaf's dtype.
        conv_w, conv_b, rest = d_sa[0:4], d_sa[4:8], d_sa[8:12]
        grads = [gr for pair in zip(conv_w, conv_b) for gr in pair] + list(rest) + d_ca[:5]
        grads += d_ca[5:] if p.qkv_b[0] is not None else [None, None, None]
        grads = [None if leaf is None else gr.to(leaf.dtype) for gr, leaf in zip(grads, leaves)]
        return (dx, None, None, *grads)


def fused_scsa(x, params, cfg: Config, provider):
    return SCSAFunction.apply(x, provider, cfg, *params)
