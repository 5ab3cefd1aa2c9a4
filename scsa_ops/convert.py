"""Swap SCSA modules in an existing model: `convert` puts in the fused `scsa_ops.SCSA`, `revert`
(or `convert(model, backend='eager')`) the pure-PyTorch reference. Both keep the very Parameter
objects (so an optimizer built before the swap still trains them), the configuration, device,
dtype, train/eval mode and the attributes a framework set on the module, and return how many
modules they replaced.

An SCSA is recognised by class (ours) or by structure: the official HZAI-ZJNU/SCSA class (and
copies of it in mmpretrain-style code bases) is found by its attributes and parameter names, with
no import of mmengine or mmpretrain. Its gate survives only as the `sa_gate` / `ca_gate` modules
and its dropout as `attn_drop`; those are read back. A look-alike that cannot be mapped exactly
(another gate, `recombination` pooling, other parameter shapes) is left alone with a warning."""
import warnings

import torch.nn as nn

from .backends import check_backend
from .module import SCSA
from .reference import SCSA as Reference
from .schema import CONVS, PARAM_NAMES

# What the official class sets in __init__ (and our reference has too), besides its parameters.
OFFICIAL_ATTRS = ("dim", "head_num", "window_size", "group_kernel_sizes", "qkv_bias", "down_sample_mode",
                  "sa_gate", "ca_gate", "attn_drop", "norm_h", "norm_w", "norm", "q", "k", "v", *CONVS)


def _gate(module):
    if isinstance(module, nn.Softmax):
        return "softmax"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    return None


def _config(m):
    """The reference constructor's arguments for SCSA module `m` (ours or foreign), or raise
    ValueError saying why it cannot be mapped."""
    if isinstance(m, Reference):
        return dict(dim=m.dim, head_num=m.head_num, window_size=m.window_size,
                    group_kernel_sizes=m.group_kernel_sizes, qkv_bias=m.qkv_bias, fuse_bn=m.fuse_bn,
                    down_sample_mode=m.down_sample_mode, attn_drop_ratio=m.attn_drop_ratio, gate_layer=m.gate_layer)
    gate, ca_gate = _gate(m.sa_gate), _gate(m.ca_gate)
    if gate is None or gate != ca_gate:
        raise ValueError(f"gates sa_gate={m.sa_gate!r}, ca_gate={m.ca_gate!r} are not both Sigmoid or both Softmax")
    if not isinstance(m.attn_drop, nn.Dropout):
        raise ValueError(f"attn_drop is {type(m.attn_drop).__name__}, not nn.Dropout")
    if m.down_sample_mode not in ("avg_pool", "max_pool") and m.window_size != -1:
        raise ValueError(f"down_sample_mode={m.down_sample_mode!r} is not supported")
    return dict(dim=int(m.dim), head_num=int(m.head_num), window_size=int(m.window_size),
                group_kernel_sizes=tuple(int(k) for k in m.group_kernel_sizes), qkv_bias=bool(m.qkv_bias),
                fuse_bn=bool(getattr(m, "fuse_bn", False)), down_sample_mode=m.down_sample_mode,
                attn_drop_ratio=float(m.attn_drop.p), gate_layer=gate)


def is_scsa(module):
    """Ours (either class) or a foreign module with the official SCSA's attributes."""
    return isinstance(module, Reference) or all(hasattr(module, a) for a in OFFICIAL_ATTRS)


def _rebuild(m, backend):
    """A module of the target class sharing m's parameters, or raise ValueError saying why not."""
    cfg = _config(m)
    new = Reference(**cfg) if backend == "eager" else SCSA(**cfg, backend=backend)
    theirs = dict(m.named_parameters())
    if set(theirs) != {n for n in PARAM_NAMES if n in dict(new.named_parameters())}:
        raise ValueError(f"parameters {sorted(theirs)} are not the official SCSA's for {cfg}")
    for name, p in theirs.items():
        sub, attr = name.rsplit(".", 1)
        own = new.get_submodule(sub)
        if own._parameters[attr].shape != p.shape:
            raise ValueError(f"{name} has shape {tuple(p.shape)}, expected {tuple(own._parameters[attr].shape)}")
        own._parameters[attr] = p
    # What a framework attached to the module (ultralytics' layer index `i`, source `f`, `type`, `np`)
    # travels with it; the new module's own attributes win.
    for key, value in vars(m).items():
        if not key.startswith("_") and key not in vars(new):
            setattr(new, key, value)
    return new.train(m.training)


def _done(m, backend):
    if backend == "eager":
        return type(m) is Reference
    return isinstance(m, SCSA) and m.backend == backend


def convert(model, backend="auto"):
    """Replace, in place, every SCSA inside `model` by `scsa_ops.SCSA(backend=backend)` (or, for
    backend='eager', by the reference module). Returns how many modules were replaced; modules
    already in the requested form are left alone, so a second call returns 0."""
    check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if is_scsa(model):
        raise ValueError("convert replaces SCSA modules inside a model; `model` is itself an SCSA: "
                         "wrap it (nn.Sequential(model)) or build scsa_ops.SCSA directly")
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not is_scsa(child) or _done(child, backend):
                continue
            where = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, SCSA) and backend != "eager":
                child.backend = backend
            else:
                try:
                    parent._modules[name] = _rebuild(child, backend)
                except ValueError as e:
                    warnings.warn(f"scsa_ops.convert: {where} ({type(child).__name__}) looks like an SCSA but "
                                  f"was left unchanged: {e}", RuntimeWarning, stacklevel=2)
                    continue
            replaced += 1
    return replaced


def revert(model):
    """Give back the pure-PyTorch reference modules: `convert(model, backend='eager')`."""
    return convert(model, backend="eager")
