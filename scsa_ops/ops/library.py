"""Fake implementations (shapes, dtypes, strides; no data) of the provider ops, so torch.compile and
torch.export trace through them. They mirror the kernels' output rules: csrc/scsa.h `dense` for the
layout of full-size outputs, the accumulator dtype for the small ones."""
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
    def _forward(x, conv_weights, conv_biases, nh_w, nh_b, nw_w, nw_b, norm_w, norm_b, wq, wk, wv, bq, bk, bv,
                 head_num, kh, kw, softmax, eps):
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
