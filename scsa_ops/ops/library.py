"""Every op of the package with torch.library, in one place: the schemas of both namespaces
(scsa_cpp, scsa_triton) come from scsa_ops/schema.py; here are the C++ ops' fake implementations
(csrc/ only implements the ops), the Triton ops (torch.library.triton_op), and `Provider`, the
calls SCSAFunction makes into one namespace of them. The fakes mirror the kernels' output rules:
csrc/scsa.h `dense` for the layout of full-size outputs, the accumulator dtype for the small ones."""

import functools
from math import prod

import torch
from torch._library.triton import is_wrap_triton_enabled, wrap_triton_enabled

from .. import schema
from ..tracing import capturing


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_format(x):
    """The layout the full-size outputs take: NCHW unless x is channels_last-dense (and not NCHW)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def memo(fn):
    """fn memoised on its arguments: what the host computes per call from shapes alone (launch
    parameters, the gradients' layout) costs a dict lookup for a shape seen before (host time per
    call: bench/gpu_model.py --host). The arguments must be ints, tuples of them and dtypes: a
    tensor as a key would stay alive in the cache (and answer for a later tensor with its id).
    Not while dynamo traces (the cache's state would change the trace between its
    restarts; the graph runs no host code anyway); symbolic sizes are unhashable and computed each
    time."""
    cache = {}

    @functools.wraps(fn)
    def cached(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        try:
            return cache[args]
        except KeyError:
            out = cache[args] = fn(*args)
            return out
        except TypeError:  # a SymInt
            return fn(*args)

    return cached


_PARAMETER_COUNT = len(schema.PARAMETERS)


def _small(x, *shape):
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def register_fakes(ns):
    # The parameter arguments (schema.PARAMETER_ARGS) travel as one pack: their names live in schema.py.
    @torch.library.register_fake(f"{ns}::forward")
    def _forward(x, *args):
        _head_num, kh, kw, _softmax, _eps = args[_PARAMETER_COUNT:]
        B, C, H, W = x.shape
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_format(x))
        return [out, _small(x, B, C, H), _small(x, 1, B, C, W), _small(x, B, C, H), _small(x, B, C, W),
                _small(x, B, C, H // kh, W // kw), _small(x, B, C)]

    @torch.library.register_fake(f"{ns}::gate_grads")
    def _gate_grads(g, x, ah, aw, kh, kw):
        B, C, H, W = x.shape
        ho, wo = H // kh, W // kw
        return (_small(x, B, C, H), _small(x, B, C, -(-H // kh), W), _small(x, B, C, ho * kh, wo),
                _small(x, B, C, ho, wo * kw))

    @torch.library.register_fake(f"{ns}::input_grad")
    def _input_grad(g, x, ah, aw, o, dy, dph, dpw, kh, kw, softmax):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_format(x))

    @torch.library.register_fake(f"{ns}::backward")
    def _backward(g, x, *args):
        params = schema.op_tensors(*args[:_PARAMETER_COUNT])
        _ph, _pw, ah, aw, _y, o, _head_num, kh, kw, softmax, _eps, input_grad = args[_PARAMETER_COUNT:]
        dx = _input_grad(g, x, ah, aw, o, None, None, None, kh, kw, softmax) if input_grad else x.new_empty(0)
        return [dx, _small(x, sum(t.numel() for t in params))]


def register_triton_ops(interpreted, *launchers):
    """scsa_triton::<launcher name> for each launcher, with its schema.SCHEMAS schema. A
    torch.library.triton_op: torch.compile traces into it and sees each kernel (wrap_triton), and the
    launcher run on fake tensors is its fake implementation. Interpreted kernels (TRITON_INTERPRET=1)
    are plain Python that wrap_triton cannot capture, so there the ops are opaque custom ops with
    the same fake."""
    for fn in launchers:
        name = f"scsa_triton::{fn.__name__}"
        if interpreted:
            torch.library.custom_op(name, fn, mutates_args=(), schema=schema.SCHEMAS[fn.__name__]).register_fake(fn)
        else:
            torch.library.triton_op(name, fn, mutates_args=(), schema=schema.SCHEMAS[fn.__name__])


class Provider:
    """What SCSAFunction (scsa_ops/autograd.py) calls: the ops of one namespace, and `fits(w,
    window_w)`, whether that provider takes rows of width w."""

    def __init__(self, ns, fits, launchers=None):
        """launchers: the Python functions the ops run, (forward, backward), where they are Python
        (the Triton ops). In eager mode they are called directly, with wrap_triton switched off as
        torch.library.triton_op's own eager path does: the op's dispatch (autograd key, redispatch,
        dynamo's disable wrapper) costs ~60 us of host time a call and adds nothing there, and
        wrap_triton's graph path ~200 us a launch. torch.compile, torch.export and TorchScript
        tracing call the ops, which they record."""
        ops = getattr(torch.ops, ns)
        # The overloads themselves: a torch.ops packet resolves its overload on every call.
        self.ns, self.fits = ns, fits
        self._ops = ops.forward.default, ops.backward.default
        self._launchers = launchers

    def __repr__(self):
        return f"Provider({self.ns!r})"

    def _call(self, which, *args):
        if self._launchers is None or capturing():
            return self._ops[which](*args)
        # torch._library.triton.set_wrap_triton_enabled(False), written out: the context manager
        # costs four times its flag's own host time.
        enabled = is_wrap_triton_enabled()
        wrap_triton_enabled.value = False
        try:
            return self._launchers[which](*args)
        finally:
            wrap_triton_enabled.value = enabled

    def forward(self, x, params, cfg, window, eps):
        """(out, p_h, p_w, a_h, a_w, Y, o); params: a list in schema.PARAM_NAMES order."""
        out, ph, pw, ah, aw, y, o = self._call(0, x, *schema.op_args(params), cfg.head_num, *window,
                                               cfg.gate == "softmax", eps)
        return out, ph, pw, ah, aw, y, o

    def backward(self, g, x, params, saved, cfg, window, eps, input_grad):
        """(dX or None, the parameters' gradients in schema.PARAM_NAMES order, each in its parameter's shape and
        dtype); params as forward's; saved: the forward's (p_h, p_w, a_h, a_w, Y, o)."""
        args = schema.op_args(params)
        dx, flat = self._call(1, g, x, *args, *saved, cfg.head_num, *window, cfg.gate == "softmax", eps, input_grad)
        params = schema.op_tensors(*args)
        dx = dx if input_grad else None
        dtypes = {t.dtype for t in params}
        if len(dtypes) == 1:  # fp16/bf16 parameters: one conversion, not one each
            dtype = dtypes.pop()
            return dx, _pieces(flat if flat.dtype == dtype else flat.to(dtype), params)
        return dx, [p if t.dtype == flat.dtype else p.to(t.dtype) for p, t in zip(_pieces(flat, params), params)]


def _pieces(flat, params):
    """flat (every gradient, back to back; an op's output or a conversion of one, so a storage of
    its own from offset 0) cut into one tensor per parameter, in its shape. Eager:
    unsafe_split_with_sizes gives plain tensors on flat's storage, not views (nothing else reads or
    writes flat, so there is no view to track), and as_strided_ shapes the multi-dimensional ones
    in place, ~0.3 and ~0.7 us a parameter where a view each took ~1 us. A traced graph takes the
    plain split and views instead: host time is not spent there, and in-place metadata changes are
    what graph compilers handle least well (torch 2.6's inductor started every piece of this
    split, given no offset, at offset 0)."""
    sizes, shaped = _layout(tuple(t.shape for t in params))
    if torch.compiler.is_compiling():
        return [piece.view(t.shape) for piece, t in zip(flat.split_with_sizes(sizes), params)]
    pieces = flat.unsafe_split_with_sizes(sizes)
    for i, shape, strides, offset in shaped:
        pieces[i].as_strided_(shape, strides, offset)
    return pieces


def contiguous_strides(shape):
    """The strides of a dense (contiguous) tensor of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return tuple(strides)


@memo
def _layout(shapes):
    """(the sizes of tensors of `shapes` laid back to back, [(index, shape, contiguous strides,
    offset)] of those with more than one dimension)."""
    sizes = [prod(shape) for shape in shapes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return sizes, [(i, s, contiguous_strides(s), starts[i]) for i, s in enumerate(shapes) if len(s) > 1]
