"""The one autograd Function of the fused SCSA, shared by every provider (Triton, C++).

A provider is a namespace of ops (library.Provider): `forward` (DESIGN.md section 2: the five
passes, returning the output and the small intermediates the backward needs) and `backward`
(section 3: both full-size passes, the small graphs differentiated by hand, the parameter
gradients; Triton: five launches, C++: one call). This file only orchestrates them.
"""
from __future__ import annotations

import contextlib
import functools
import linecache
from dataclasses import dataclass
from typing import List, Optional

import torch

from .reference import EPS, forward_parts, window_of
from .schema import PARAM_NAMES, PARAMETERS, Params, op_args
from .tracing import exporting


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
        return window, provider.forward(x, params, cfg, window, EPS)


def eager_math(x, params, cfg: Config):
    """The reference math (avg or global pooling, no dropout) on parameters in PARAM_NAMES order."""
    p = Params(params)
    return forward_parts(x, p.conv_w, p.conv_b, p.norm_h, p.norm_w, p.norm_c, p.qkv_w, p.qkv_b, cfg.head_num,
                         cfg.window_size, "avg_pool", cfg.gate)[-1]


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
            # create_graph=True: the backward ops are not differentiable themselves (no autograd
            # formula), so a second derivative through this graph would be silently wrong.
            raise RuntimeError("SCSA's fused backward is not twice differentiable (create_graph=True: gradient "
                               "penalties, meta-learning); use backend='eager' for this model")
        x, ph, pw, ah, aw, y, o, *params = ctx.saved_tensors
        cfg, provider = ctx.cfg, ctx.provider
        with _device_of(x):
            dx, grads = provider.backward(g, x, params, (ph, pw, ah, aw, y, o), cfg, ctx.window, EPS,
                                          ctx.needs_input_grad[0])
        # The gradients come in PARAM_NAMES order, without those of absent q/k/v biases (the last).
        return (dx, None, None, *grads, *[None] * (len(PARAM_NAMES) - len(grads)))


def forward_op(x, params, cfg: Config, provider):
    """The output of the provider's forward op, outside autograd: what a deployment graph records
    (TorchScript, torch.export: neither can serialise a Python autograd.Function)."""
    if torch.jit.is_tracing():
        with _device_of(x):
            return _traceable_forward(provider.ns)(x, *op_args(params), cfg.head_num, cfg.window_size,
                                                    cfg.gate == "softmax", EPS)
    return _forward(x, provider, cfg, params)[1][0]


@functools.lru_cache(maxsize=None)
def _traceable_forward(ns):
    """The forward op of namespace `ns` in a TorchScript function that reads the pooling window
    from x's size: torch.jit.trace records the function, aten::size calls included, where a window
    computed in Python would be baked in as the traced size (wrong for global pooling at any other
    size). Generated from schema.PARAMETERS; registered with linecache so that torch.jit.script
    can read its source, and saved with a traced model like any scripted function."""
    types = {"Tensor": "Tensor", "Tensor[]": "List[Tensor]", "Tensor?": "Optional[Tensor]"}
    args = PARAMETERS
    name = f"{ns}_forward"
    source = f"""def {name}(x: Tensor, {", ".join(f"{a}: {types[kind]}" for kind, a in args)}, head_num: int,
        window_size: int, softmax: bool, eps: float) -> Tensor:
    kh, kw = window_size, window_size
    if window_size == -1:
        kh, kw = x.size(2), x.size(3)
    return torch.ops.{ns}.forward(x, {", ".join(a for _, a in args)}, head_num, kh, kw, softmax, eps)[0]
"""
    filename = f"<scsa_ops.autograd.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {"torch": torch, "Tensor": torch.Tensor, "List": List, "Optional": Optional}
    exec(compile(source, filename, "exec"), scope)
    fn = scope[name]
    fn.__module__ = __name__
    return torch.jit.script(fn)


def fused_scsa(x, params, cfg: Config, provider):
    # A deployment graph (TorchScript, torch.export) is inference and records the op itself.
    deploying = torch.jit.is_tracing() or exporting()
    if not deploying and torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return SCSAFunction.apply(x, provider, cfg, *params)
    # Inference: nothing to save, so skip the autograd.Function machinery (tens of microseconds).
    return forward_op(x, params, cfg, provider)
