"""The one autograd Function of the fused SCSA, shared by every provider (Triton, C++).

A provider is a namespace of ops (library.Provider): `forward` (DESIGN.md section 2: the five
passes, returning the output and the small intermediates the backward needs), and for the backward
(section 3) either `backward`, the whole of it in one call (the C++ provider: both full-size passes,
the small graphs differentiated by hand, the parameter gradients), or its two full-size passes
`gate_grads, input_grad`, between which this file differentiates the small graphs (spatial gate,
channel attention) with torch.func.vjp on recomputed small tensors (the Triton provider, for now).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from .reference import EPS, channel_attention_logits, channel_gate, forward_parts, spatial_gate, window_of
from .schema import CHANNEL_NAMES, PARAM_NAMES, SPATIAL_NAMES, Params, in_param_order, indices


@dataclass(frozen=True)
class Config:
    """What the ops take besides tensors (the kernel sizes come with the conv weights)."""
    head_num: int
    window_size: int
    gate: str


def _device_of(x):
    # Triton launches on the current CUDA device: make it x's. A no-op elsewhere, which also keeps
    # CPU graphs traceable by torch.compile (dynamo does not trace torch.cuda.device_of).
    return torch.cuda.device_of(x) if x.is_cuda else contextlib.nullcontext()


def _forward(x, provider, cfg, params):
    """(pooling window, provider.forward's (out, p_h, p_w, a_h, a_w, Y, o))."""
    window = window_of(cfg.window_size, *x.shape[2:])
    with _device_of(x):
        return window, provider.forward(x, Params(params), cfg, window, EPS)


# Per parameter set, keyed by the id of its first tensor while that tensor lives: the (id, version)
# of every tensor last checked, and whether all were finite. Reading the answer of a check waits for
# the GPU, so it runs again only after a parameter was written (its version counter moved) or
# swapped for another tensor.
_checked = {}


def parameters_finite(params):
    """Whether every tensor of `params` is finite (True while tracing: a graph cannot branch on
    values)."""
    if torch.compiler.is_compiling() or any(is_fake(t) for t in params):
        return True
    def check():
        return bool(torch.stack([t.detach().isfinite().all() for t in params]).all())

    if any(t.is_inference() for t in params):  # no version counter to cache by
        return check()
    key, state = id(params[0]), [(id(t), t._version) for t in params]
    seen = _checked.get(key)
    if seen is None or seen[0] != state:
        if seen is None:
            weakref.finalize(params[0], _checked.pop, key, None)
        seen = _checked[key] = (state, check())
    return seen[1]


def eager_math(x, params, cfg: Config):
    """The reference math (avg or global pooling, no dropout) on parameters in PARAM_NAMES order."""
    p = Params(params)
    return forward_parts(x, p.conv_w, p.conv_b, p.norm_h, p.norm_w, p.norm_c, p.qkv_w, p.qkv_b, cfg.head_num,
                         cfg.window_size, "avg_pool", cfg.gate)[-1]


def _eager_backward(x, params, cfg, g, needs_input_grad):
    """The eager module's own backward, in x's dtype: with a non-finite parameter the forward ran the
    eager ops (the providers' forward), and where NaN and Inf go in the gradients depends just as
    much on how each op is written, and on fp16's range."""
    x = x.detach().requires_grad_(needs_input_grad)
    leaves = [None if t is None else t.detach().requires_grad_() for t in params]
    with torch.enable_grad():
        out = eager_math(x, [None if t is None else t.to(x.dtype) for t in leaves], cfg)
        wanted = [t for t in [x, *leaves] if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, g))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in [x, *leaves])


_SPATIAL, _CHANNEL = indices(SPATIAL_NAMES), indices(CHANNEL_NAMES)


class SCSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, provider, cfg: Config, *params):
        window, (out, ph, pw, ah, aw, y, o) = _forward(x, provider, cfg, params)
        ctx.provider, ctx.cfg, ctx.window = provider, cfg, window
        ctx.save_for_backward(x, ph, pw, ah, aw, y, o, *params)
        return out

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: the backward's recomputed small tensors are constants, so a second
            # derivative through this graph would be silently wrong.
            raise RuntimeError("SCSA's fused backward is not twice differentiable (create_graph=True: gradient "
                               "penalties, meta-learning); use backend='eager' for this model")
        x, ph, pw, ah, aw, y, o, *params = ctx.saved_tensors
        cfg, provider, (kh, kw) = ctx.cfg, ctx.provider, ctx.window
        if not parameters_finite([t for t in params if t is not None]):
            dx, *grads = _eager_backward(x, params, cfg, g, ctx.needs_input_grad[0])
            return (dx, None, None, *grads)
        if provider.fused_backward:
            with _device_of(x):
                dx, grads = provider.backward(g, x, Params(params), (ph, pw, ah, aw, y, o), cfg, ctx.window, EPS,
                                              ctx.needs_input_grad[0])
            return (dx, None, None, *in_param_order(grads))
        H, W = x.shape[2:]
        ho, wo = H // kh, W // kw
        acc = ah.dtype
        with _device_of(x):
            r, s, u, v = provider.gate_grads(g, x, ah, aw, ctx.window)
        # The small graphs are differentiated with torch.func.vjp (which torch.compile traces, unlike
        # torch.autograd.grad), each as a function of the parameters it uses (the qkv biases are
        # optional); the casts to the working dtype sit inside, so each gradient comes back in its
        # leaf's dtype.
        spatial_at = [i for i in _SPATIAL if params[i] is not None]
        channel_at = [i for i in _CHANNEL if params[i] is not None]

        def working(ts, at):
            """Params with the tensors ts, cast to the working dtype, at the positions `at`."""
            full = [None] * len(PARAM_NAMES)
            for i, t in zip(at, ts):
                full[i] = t.to(acc)
            return Params(full)

        def channel_part(y_, *ts):
            p = working(ts, channel_at)
            return channel_gate(channel_attention_logits(y_, *p.norm_c, p.qkv_w, p.qkv_b, cfg.head_num), cfg.gate)

        def spatial_part(ph_, pw_, *ts):
            p = working(ts, spatial_at)
            return (spatial_gate(ph_, p.conv_w, p.conv_b, *p.norm_h, cfg.gate),
                    spatial_gate(pw_, p.conv_w, p.conv_b, *p.norm_w, cfg.gate))

        # A backward called inside torch.autocast must not recompute the small graphs in low precision.
        with torch.autocast(x.device.type, enabled=False):
            a_c, vjp_ca = torch.func.vjp(channel_part, y, *[params[i] for i in channel_at])
            dy, *d_ca = vjp_ca((ah * r).sum(-1))
            dy = dy / (kh * kw)
            dah = a_c[..., None] * r
            dah[:, :, :ho * kh] += (u.unflatten(2, (ho, kh)) * dy.unsqueeze(3)).sum(-1).flatten(2)
            daw = a_c[..., None] * s.sum(2)
            daw[:, :, :wo * kw] += (v.unflatten(3, (wo, kw)) * dy.unsqueeze(4)).sum(2).flatten(2)
            _, vjp_sa = torch.func.vjp(spatial_part, ph / W, pw.sum(0) / H, *[params[i] for i in spatial_at])
            dph, dpw, *d_sa = vjp_sa((dah, daw))
        dx = None
        if ctx.needs_input_grad[0]:
            with _device_of(x):
                dx = provider.input_grad(g, x, ah, aw, o, dy, dph / W, dpw / H, ctx.window,
                                         cfg.gate == "softmax")
        grads = [None] * len(PARAM_NAMES)
        for i, d in zip(spatial_at + channel_at, d_sa + d_ca):
            grads[i] = d
        return (dx, None, None, *grads)


def fused_scsa(x, params, cfg: Config, provider):
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return SCSAFunction.apply(x, provider, cfg, *params)
    # Inference: nothing to save, so skip the autograd.Function machinery (tens of microseconds).
    return _forward(x, provider, cfg, params)[1][0]
