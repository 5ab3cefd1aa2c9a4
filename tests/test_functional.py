"""scsa_ops.functional.scsa: the module's math as a function of the input and a mapping of the
official parameter names, on every backend, differentiable w.r.t. input and every parameter."""
import pytest
import torch

from helpers import TOL, pair, rel_err
from scsa_ops import functional
from scsa_ops.schema import PARAM_NAMES

CASES = [(dict(dim=16, head_num=2), (2, 16, 9, 16)),
         (dict(dim=16, window_size=-1, gate_layer="softmax", qkv_bias=True, group_kernel_sizes=(1, 3, 5, 7)),
          (2, 16, 5, 11))]


def _kwargs(cfg):
    return {k: cfg[k] for k in ("head_num", "window_size", "gate_layer") if k in cfg}


@pytest.mark.parametrize("cfg,shape", CASES, ids=["sigmoid", "global-softmax-bias"])
def test_matches_the_module(cfg, shape, fused_on):
    backend, device = fused_on
    ref, _ = pair(cfg, backend=backend, device=device)
    params = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    go = torch.randn(shape, dtype=torch.float64, device=device)
    out = functional.scsa(x, params, backend=backend, **_kwargs(cfg))
    grads = torch.autograd.grad(out, [x, *params.values()], go)
    out_r = ref(x)
    grads_r = torch.autograd.grad(out_r, [x, *ref.parameters()], go)
    assert rel_err(out, out_r) < TOL[torch.float64]
    for name, g, g_r in zip(["x", *params], grads, grads_r):
        assert (g - g_r).norm() <= TOL["fp64_order"] * g_r.norm().clamp_min(1e-3), name


def test_gradcheck():
    """gradcheck through the functional API (a mapping of tensors, each differentiable). The C++
    provider: the layer above the providers is the same for both, and Triton's backward has its own
    gradcheck in test_fused.py (each costs a minute in the interpreter)."""
    backend, device = "cpp", "cpu"
    ref, _ = pair(dict(dim=8, head_num=2, qkv_bias=True), backend=backend, device=device)
    names = [n for n, _ in ref.named_parameters()]
    x = torch.randn(1, 8, 7, 9, dtype=torch.float64, device=device, requires_grad=True)
    tensors = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    f = lambda x, *ts: functional.scsa(x, dict(zip(names, ts)), head_num=2, window_size=3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *tensors), **TOL["gradcheck"], fast_mode=True)


def test_qkv_biases_may_be_left_out():
    ref, _ = pair(dict(dim=16), backend="cpp", device="cpu")
    params = dict(ref.named_parameters())
    assert not any(n.startswith(("q.", "k.", "v.")) and n.endswith("bias") for n in params)
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64)
    assert rel_err(functional.scsa(x, params, backend="cpp"), ref(x)) < TOL[torch.float64]


@pytest.mark.parametrize("change,exc,match", [
    (lambda p: p.update({"norm.wieght": p["norm.weight"]}), ValueError, r"unknown \['norm.wieght'\]"),
    (lambda p: p.pop("norm_h.bias"), ValueError, r"missing \['norm_h.bias'\]"),
    (lambda p: p.update({"k.weight": p["k.weight"].view(16)}), ValueError,
     r"params\['k.weight'\] must have shape \(16, 1, 1, 1\)"),
    (lambda p: p.update({"local_dwc.weight": torch.zeros(4, 1, 4, dtype=torch.float64)}), ValueError, "odd"),
])
def test_bad_params(change, exc, match):
    ref, _ = pair(dict(dim=16), backend="cpp", device="cpu")
    params = dict(ref.named_parameters())
    change(params)
    with pytest.raises(exc, match=match):
        functional.scsa(torch.randn(1, 16, 7, 7, dtype=torch.float64), params, backend="cpp")


def test_bad_options():
    ref, _ = pair(dict(dim=16), backend="cpp", device="cpu")
    params = dict(ref.named_parameters())
    x = torch.randn(1, 16, 7, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="divisible by head_num=3"):
        functional.scsa(x, params, head_num=3)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        functional.scsa(x, params, backend="gpu")
    with pytest.raises(ValueError, match="6x7.*window_size=7"):
        functional.scsa(x[:, :, :6], params)
    assert set(PARAM_NAMES) >= set(params)
