"""The one parameter schema: the official module's parameter names grouped by the pass that uses
them, the order every internal list of parameters follows (PARAM_NAMES), and the torch.library
schemas of the ops, which both namespaces (scsa_cpp, scsa_triton) define from here: csrc/ only
implements them. One spelling per op argument: `norm_h_*` / `norm_w_*` for the spatial gates'
GroupNorm(4) of the H and W branches, `norm_c_*` for the channel attention's GroupNorm(1) (the
official module's `norm`)."""
from __future__ import annotations

import torch

# F2, the spatial gates: the four depthwise convs, shared by both branches, one per channel group.
CONVS = ("local_dwc", "global_dwc_s", "global_dwc_m", "global_dwc_l")
CONV_WEIGHTS = tuple(f"{m}.weight" for m in CONVS)
CONV_BIASES = tuple(f"{m}.bias" for m in CONVS)
NORM_H = ("norm_h.weight", "norm_h.bias")
NORM_W = ("norm_w.weight", "norm_w.bias")
# F4, the channel attention: its GroupNorm(1) and the depthwise 1x1 q, k, v.
NORM_C = ("norm.weight", "norm.bias")
QKV_WEIGHTS = ("q.weight", "k.weight", "v.weight")
QKV_BIASES = ("q.bias", "k.bias", "v.bias")  # only with qkv_bias=True

# The order of every internal list of parameters, of the ops' parameter arguments (PARAMETER_ARGS,
# the conv weights and biases as two lists) and of the backward op's flat gradients. csrc/scsa.h's
# indices into the latter (kConvW, ...) follow it; tests/test_cpp.py holds them to it.
_GROUP_NAMES = (CONV_WEIGHTS, CONV_BIASES, NORM_H, NORM_W, NORM_C, QKV_WEIGHTS, QKV_BIASES)
PARAM_NAMES = sum(_GROUP_NAMES, ())
OPTIONAL = frozenset(QKV_BIASES)

_INDEX = {name: i for i, name in enumerate(PARAM_NAMES)}


def indices(names):
    return tuple(_INDEX[n] for n in names)


_GROUPS = [slice(_INDEX[g[0]], _INDEX[g[0]] + len(g)) for g in _GROUP_NAMES]


class Params:
    """A list of parameter tensors in PARAM_NAMES order, grouped as the passes take them."""

    __slots__ = ("conv_w", "conv_b", "norm_h", "norm_w", "norm_c", "qkv_w", "qkv_b")

    def __init__(self, params):
        self.conv_w, self.conv_b, self.norm_h, self.norm_w, self.norm_c, self.qkv_w, self.qkv_b = (
            params[group] for group in _GROUPS)


def op_args(params):
    """The parameter arguments of the ops (PARAMETER_ARGS) from a list in PARAM_NAMES order: the same
    order, the conv weights and biases grouped as lists."""
    return (params[_GROUPS[0]], params[_GROUPS[1]], *params[_GROUPS[1].stop:])


def shape(name, dim, kernel_sizes):
    """The shape of the official module's parameter `name` for `dim` channels."""
    if name in CONV_WEIGHTS:
        return (dim // 4, 1, kernel_sizes[CONV_WEIGHTS.index(name)])
    if name in CONV_BIASES:
        return (dim // 4,)
    return (dim, 1, 1, 1) if name in QKV_WEIGHTS else (dim,)


def op_tensors(conv_weights, conv_biases, *rest):
    """The ops' parameter arguments as one list in PARAM_NAMES order, without absent q/k/v biases:
    the tensors whose gradients the backward op returns, back to back."""
    return [*conv_weights, *conv_biases, *[t for t in rest if t is not None]]


PARAMETER_ARGS = (
    "Tensor[] conv_weights, Tensor[] conv_biases, Tensor norm_h_weight, Tensor norm_h_bias, Tensor norm_w_weight, "
    "Tensor norm_w_bias, Tensor norm_c_weight, Tensor norm_c_bias, Tensor q_weight, Tensor k_weight, Tensor v_weight, "
    "Tensor? q_bias, Tensor? k_bias, Tensor? v_bias")
# The same, as (type, name) pairs.
PARAMETERS = tuple(tuple(arg.split()) for arg in PARAMETER_ARGS.split(", "))

# The ops of one namespace (DESIGN.md sections 2-3). forward returns [out, p_h, p_w, a_h, a_w, Y, o]:
# the output and the small intermediates the backward needs. backward is the whole backward in one
# call, [dX (empty unless input_grad), every parameter gradient, flat, in PARAM_NAMES order, in the
# accumulator dtype] (one flat tensor: op outputs may not alias, and cutting it copies nothing);
# gate_grads and input_grad are its two full-size passes, also ops of their own. The pooling window
# is SymInt: with global pooling it is the map's size, which torch.export keeps symbolic.
SCHEMAS = {
    "forward": f"(Tensor x, {PARAMETER_ARGS}, int head_num, SymInt kh, SymInt kw, bool softmax, float eps) -> Tensor[]",
    "gate_grads": ("(Tensor g, Tensor x, Tensor ah, Tensor aw, SymInt kh, SymInt kw) "
                   "-> (Tensor, Tensor, Tensor, Tensor)"),
    "input_grad": ("(Tensor g, Tensor x, Tensor ah, Tensor aw, Tensor o, Tensor dy, Tensor dph, Tensor dpw, "
                   "SymInt kh, SymInt kw, bool softmax) -> Tensor"),
    "backward": (f"(Tensor g, Tensor x, {PARAMETER_ARGS}, Tensor ph, Tensor pw, Tensor ah, Tensor aw, Tensor y, "
                 "Tensor o, int head_num, SymInt kh, SymInt kw, bool softmax, float eps, bool input_grad) -> Tensor[]"),
}

_libraries = {}


def define(ns):
    """Define every op of SCHEMAS in namespace `ns` (once per process)."""
    if ns not in _libraries:
        lib = _libraries[ns] = torch.library.Library(ns, "FRAGMENT")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
