import math

import torch

from scsa_ops import SCSA
from scsa_ops.reference import SCSA as Reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Every fused provider this machine can run, with the device its tensors live on: Triton on CUDA
# (or its interpreter on CPU tensors), the C++ path on CPU tensors.
FUSED = [("triton", DEVICE), ("cpp", "cpu")]
# ||out - ref|| / ||ref|| against the fp64 reference (DESIGN.md section 4)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def randomize_(module, generator=None, scale=0.5):
    """Random parameters: the default init (identity GroupNorm, zero biases) hides bugs."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if name.split(".")[0] in ("norm_h", "norm_w", "norm") and name.endswith("weight"):
                r = 1.0 + scale * r
            else:
                r = scale * r / (math.sqrt(p.shape[-1]) if p.dim() == 3 else 1.0)
            p.copy_(r.to(p))
    return module


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def pair(cfg, seed=0, backend="triton", device=DEVICE):
    """(fp64 reference with random parameters, fused module carrying the same state dict)."""
    g = torch.Generator().manual_seed(seed)
    ref = randomize_(Reference(**cfg).double(), g).to(device)
    fused = SCSA(**cfg, backend=backend).double().to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(module, x, grad_out):
    """Forward + backward of (out * grad_out).sum(): (out, dx, {name: dparam})."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def grad_err(actual, expected):
    """Relative error of every parameter gradient, with a floor for gradients that are zero in
    exact arithmetic (e.g. norm_h.bias under a softmax gate, which is shift-invariant)."""
    scale = max(g.norm().item() for g in expected.values())
    return {n: (actual[n].double() - expected[n].double()).norm().item()
            / max(expected[n].norm().item(), 1e-3 * scale) for n in expected}


def assert_matches_reference(cfg, shape, dtype, backend, device, channels_last=False, seed=0):
    """The fused module against the fp64 reference, forward, dx and every parameter gradient, on
    random data and parameters. fp64: agreement to ~1e-11. Lower precisions: DESIGN.md's tolerance,
    and (flash-attention's rule) within 2x the error of the same-precision eager module."""
    ref, fused = (m.eval() for m in pair(cfg, seed=seed, backend=backend, device=device))  # dropout off
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, dtype=torch.float64, generator=g).to(device)
    go = torch.randn(shape, dtype=torch.float64, generator=g).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out_r, dx_r, dp_r = run(ref, x, go)
    out_f, dx_f, dp_f = run(fused.to(dtype), x.to(dtype).contiguous(memory_format=fmt), go)
    assert out_f.dtype == dtype and dx_f.dtype == dtype
    if dtype == torch.float64:
        assert rel_err(out_f, out_r) < TOL[dtype] and rel_err(dx_f, dx_r) < TOL[dtype]
        errs = grad_err(dp_f, dp_r)
        assert max(errs.values()) < 1e-11, errs
        return
    eager = pair(cfg, seed=seed, backend="eager", device=device)[1].to(dtype).eval()
    out_e, dx_e, dp_e = run(eager, x.to(dtype), go)
    for f, e, r in ((out_f, out_e, out_r), (dx_f, dx_e, dx_r)):
        assert rel_err(f, r) < TOL[dtype]
        assert rel_err(f, r) <= 2 * rel_err(e, r) + 1e-6
    e_f, e_e = grad_err(dp_f, dp_r), grad_err(dp_e, dp_r)
    for n in e_f:
        assert e_f[n] <= 2 * e_e[n] + 4 * TOL[dtype] * (dtype != torch.float32) + 1e-5, (n, e_f[n], e_e[n])
