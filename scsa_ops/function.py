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
import operator
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from .reference import EPS, forward_parts, window_of
from .schema import PARAMETER_ARGS, Params, in_param_order, op_args, op_params
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


# Per parameter set, keyed by the id of its first tensor while that tensor lives: the ids, versions
# and data pointers of the tensors last checked, and whether all were finite. Reading the answer of
# a check waits for the GPU, so it runs again only after a parameter was written (its version
# counter moved) or swapped for another tensor, or given new memory through `.data` (nn.Module.to
# and .float() / .half() convert so, keeping each tensor and its version: 1e300 in fp64 is Inf in
# fp32). The checked tensors' storages stay referenced beside the answer, so a data pointer seen
# again is the same memory, not a new storage at a freed address. (In-place writes through `.data`
# bypass the version counter, as they bypass autograd's own checks.)
_checked = {}
_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr


def parameters_finite(params):
    """Whether every tensor of `params` (a list in schema.OP_ORDER, as both the forward and the
    backward pass it) is finite (True while tracing: a graph cannot branch on values)."""
    if torch.compiler.is_compiling():
        return True
    key = id(params[0])
    seen = _checked.get(key)
    try:
        tensors = (tuple(map(id, params)), tuple(map(_version, params)))
    except RuntimeError:  # an inference tensor: no version counter to cache by
        tensors = None
    # Data pointers last: a fake tensor (never cached) warns when asked for one.
    if tensors is not None and seen is not None and seen[0] == tensors and seen[1] == tuple(map(_data_ptr, params)):
        return seen[2]
    if is_fake(params[0]):  # fake tensors come all together (shape propagation): nothing to read
        return True
    finite = bool(torch.stack([t.detach().isfinite().all() for t in params]).all())
    if tensors is None:
        return finite
    try:
        pointers, storages = tuple(map(_data_ptr, params)), [t.untyped_storage() for t in params]
    except RuntimeError:  # a tensor without storage of its own (a wrapper subclass): not cached
        return finite
    if seen is None:
        weakref.finalize(params[0], _checked.pop, key, None)
    _checked[key] = (tensors, pointers, finite, storages)
    return finite


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
        if not parameters_finite(op_params(params)):
            dx, *grads = _eager_backward(x, params, cfg, g, ctx.needs_input_grad[0])
            return (dx, None, None, *grads)
        with _device_of(x):
            dx, grads = provider.backward(g, x, params, (ph, pw, ah, aw, y, o), cfg, ctx.window, EPS,
                                          ctx.needs_input_grad[0])
        return (dx, None, None, *in_param_order(grads))


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
    size). Generated from schema.PARAMETER_ARGS; registered with linecache so that torch.jit.script
    can read its source, and saved with a traced model like any scripted function."""
    types = {"Tensor": "Tensor", "Tensor[]": "List[Tensor]", "Tensor?": "Optional[Tensor]"}
    args = [arg.split() for arg in PARAMETER_ARGS.split(", ")]
    name = f"{ns}_forward"
    source = f"""def {name}(x: Tensor, {", ".join(f"{a}: {types[kind]}" for kind, a in args)}, head_num: int,
        window_size: int, softmax: bool, eps: float) -> Tensor:
    kh, kw = window_size, window_size
    if window_size == -1:
        kh, kw = x.size(2), x.size(3)
    return torch.ops.{ns}.forward(x, {", ".join(a for _, a in args)}, head_num, kh, kw, softmax, eps)[0]
"""
    filename = f"<scsa_ops.function.{name}>"
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
