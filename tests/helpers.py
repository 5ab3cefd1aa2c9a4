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
