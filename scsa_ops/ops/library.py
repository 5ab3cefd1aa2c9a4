"""Every op of the package with torch.library, in one place: the C++ ops' fake implementations
(the ops themselves are defined in csrc/ops.cpp), the Triton ops (torch.library.triton_op), and
`Provider`, the calls SCSAFunction makes into one namespace of them. Both namespaces, scsa_cpp and
scsa_triton, share one schema:

  forward(Tensor x, Tensor[] conv_weights, Tensor[] conv_biases, Tensor norm_h_weight, Tensor norm_h_bias,
          Tensor norm_w_weight, Tensor norm_w_bias, Tensor norm_weight, Tensor norm_bias, Tensor q_weight,
          Tensor k_weight, Tensor v_weight, Tensor? q_bias, Tensor? k_bias, Tensor? v_bias, int head_num, int kh,
          int kw, bool softmax, float eps) -> Tensor[]
          # [out, p_h, p_w, a_h, a_w, Y, o]
  gate_grads(Tensor g, Tensor x, Tensor ah, Tensor aw, int kh, int kw) -> (Tensor, Tensor, Tensor, Tensor)
  input_grad(Tensor g, Tensor x, Tensor ah, Tensor aw, Tensor o, Tensor dy, Tensor dph, Tensor dpw,
             int kh, int kw, bool softmax) -> Tensor

The fakes mirror the kernels' output rules: csrc/scsa.h `dense` for the layout of full-size outputs,
the accumulator dtype for the small ones."""
import torch


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_format(x):
    """The layout the full-size outputs take: NCHW unless x is channels_last-dense (and not NCHW)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _small(x, *shape):
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def register_fakes(ns):
    @torch.library.register_fake(f"{ns}::forward")
    def _forward(x, conv_weights, conv_biases, norm_h_weight, norm_h_bias, norm_w_weight, norm_w_bias, norm_weight,
                 norm_bias, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, head_num, kh, kw, softmax, eps):
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


def register_triton_ops(interpreted, *launchers):
    """scsa_triton::<launcher name> for each launcher (schemas from their annotations). A
    torch.library.triton_op: torch.compile traces into it and sees each kernel (wrap_triton), and the
    launcher run on fake tensors is its fake implementation. Interpreted kernels (TRITON_INTERPRET=1)
    are plain Python that wrap_triton cannot capture, so there the ops are opaque custom ops with
    the same fake."""
    for fn in launchers:
        name = f"scsa_triton::{fn.__name__}"
        if interpreted:
            torch.library.custom_op(name, fn, mutates_args=()).register_fake(fn)
        else:
            torch.library.triton_op(name, fn, mutates_args=())


class Provider:
    """What SCSAFunction (scsa_ops/function.py) calls: the ops of one namespace, and `fits(w,
    window_w)`, whether that provider takes rows of width w."""

    def __init__(self, ns, fits):
        ops = getattr(torch.ops, ns)
        # The overloads themselves: a torch.ops packet resolves its overload on every call.
        self.ns, self.fits = ns, fits
        self._forward, self._gate_grads, self._input_grad = (
            ops.forward.default, ops.gate_grads.default, ops.input_grad.default)

    def __repr__(self):
        return f"Provider({self.ns!r})"

    def forward(self, x, p, cfg, window, eps):
        """(out, p_h, p_w, a_h, a_w, Y, o); p: function.Params."""
        out, ph, pw, ah, aw, y, o = self._forward(
            x, p.conv_w, p.conv_b, *p.norm_h, *p.norm_w, *p.norm, *p.qkv_w, *p.qkv_b, cfg.head_num, *window,
            cfg.gate == "softmax", eps)
        return out, ph, pw, ah, aw, y, o

    def gate_grads(self, g, x, ah, aw, window):
        return self._gate_grads(g, x, ah, aw, *window)

    def input_grad(self, g, x, ah, aw, o, dy, dph, dpw, window, softmax):
        return self._input_grad(g, x, ah, aw, o, dy, dph, dpw, *window, softmax)
