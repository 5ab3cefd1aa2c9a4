"""Every fused provider (Triton, C++) against the package's reference: forward, the input gradient
and every parameter gradient, on random data and random parameters, across the options of
DESIGN.md. `fused_on` is the (backend, device) pair under test."""
import pytest
import torch

from cases import CONFIGS, LOW_PRECISION, ids
from helpers import (
    TOL,
    assert_matches_reference,
    check_gradcheck,
    check_low_precision,
    grad_err,
    input_rounding_errors,
    pair,
    rel_err,
    run,
    spatial_gate_condition,
)
from scsa_ops import SCSA
from scsa_ops.schema import PARAM_NAMES


@pytest.mark.parametrize("cfg,shape", CONFIGS, ids=ids(CONFIGS))
def test_fp64_matches_reference(cfg, shape, fused_on):
    assert_matches_reference(cfg, shape, torch.float64, *fused_on)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg,shape", LOW_PRECISION, ids=ids(LOW_PRECISION))
def test_low_precision(cfg, shape, dtype, channels_last, fused_on):
    """Output and input gradient keep the input's dtype and memory format; accuracy as
    helpers.assert_matches_reference."""
    backend, dev = fused_on
    if backend == "triton" and dev == "cpu" and dtype == torch.float16:
        pytest.skip("in the Triton interpreter fp16 runs bf16's code (16-bit loads, fp32 math); bf16 runs here, "
                    "both run on a GPU")
    check_low_precision(cfg, shape, dtype, channels_last, backend, dev)


def test_error_bound_includes_input_rounding(fused_on):
    """An ill-conditioned case (bf16, D = 3, one-pixel windows): k.weight's gradient moves by several
    percent when only the inputs are rounded to bf16, while the bf16 eager module may land much
    closer by chance. The fused gradient is exact arithmetic on its rounded inputs, which is the
    bound helpers.assert_matches_reference allows for."""
    backend, dev = fused_on
    cfg = dict(dim=12, head_num=4, window_size=1, group_kernel_sizes=(7, 5, 1, 5), qkv_bias=True)
    shape, seed, dtype = (2, 12, 4, 4), 175, torch.bfloat16
    ref, fused = (m.eval() for m in pair(cfg, seed=seed, backend=backend, device=dev))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, dtype=torch.float64, generator=g).to(dev)
    go = torch.randn(shape, dtype=torch.float64, generator=g).to(dev)
    exact = run(ref, x, go)
    _, _, dp_f = run(fused.to(dtype), x.to(dtype).contiguous(memory_format=torch.channels_last), go)
    rounding = input_rounding_errors(cfg, seed, dev, dtype, x, go, exact)[2]
    err = grad_err(dp_f, exact[2])
    assert rounding["k.weight"] > 0.03  # the ill-conditioned gradient this case is about
    for n in err:
        assert abs(err[n] - rounding[n]) < 0.2 * rounding[n] + 2e-3, (n, err[n], rounding[n])
    assert_matches_reference(cfg, shape, dtype, backend, dev, channels_last=True, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pixel_maps(fused_on, dtype):
    """Regression case from the fuzz campaign: 1x1 maps (a CIFAR ResNet's last stage) with global
    pooling. Each spatial-gate GroupNorm group holds only G values, so results amplify roundoff
    (input rounding in bf16 moves dx by ~3%) — within helpers.assert_matches_reference's bound. (With
    G = 2 the group normalises to +-1 whatever its inputs and the conv gradients are pure roundoff
    for any implementation: the fuzz domain leaves such layers out.)"""
    cfg = dict(dim=16, window_size=-1, group_kernel_sizes=(1, 7, 7, 3))
    for seed in range(3):
        assert_matches_reference(cfg, (2, 16, 1, 1), dtype, *fused_on, seed=seed)


def test_ill_conditioned_spatial_groupnorm(fused_on):
    """Regression case from the fuzz campaign (fp32): a spatial-gate GroupNorm group of four values
    (two channels of a 2-pixel-high map) sits at 0.61 with a spread of 0.005, so one ulp of a conv
    output moves its gate by ~90 ulp, in any fp32 implementation. The eager module happened to
    land 10x closer than the fused op; both are well inside DESIGN.md's fp32 tolerance, which is
    what this case is held to (the fuzz domain leaves out groups conditioned worse than 20x)."""
    cfg = dict(dim=8, head_num=1, window_size=-1, group_kernel_sizes=(9, 9, 9, 1), gate_layer="softmax")
    shape, seed = (2, 8, 2, 26), 389
    assert spatial_gate_condition(cfg, seed, shape) > 50
    backend, dev = fused_on
    ref, fused = (m.eval() for m in pair(cfg, seed=seed, backend=backend, device=dev))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, dtype=torch.float64, generator=g).to(dev)
    go = torch.randn(shape, dtype=torch.float64, generator=g).to(dev)
    out_r, dx_r, dp_r = run(ref, x, go)
    out_f, dx_f, dp_f = run(fused.float(), x.float(), go)
    assert rel_err(out_f, out_r) < TOL[torch.float32] and rel_err(dx_f, dx_r) < TOL[torch.float32]
    assert max(grad_err(dp_f, dp_r, 1e-2).values()) < 10 * TOL[torch.float32]


def test_non_dense_strides(fused_on):
    """Any strides are read as they are (here a slice and a transposed view); the output is dense."""
    backend, dev = fused_on
    cfg = dict(dim=16, head_num=2)
    ref, fused = pair(cfg, backend=backend, device=dev)
    base = torch.randn(2, 32, 23, 17, dtype=torch.float64, device=dev)
    x = base[:, ::2].transpose(2, 3)  # (2, 16, 17, 23), neither NCHW- nor NHWC-contiguous
    go = torch.randn(x.shape, dtype=torch.float64, device=dev)
    out_r, dx_r, _ = run(ref, x.contiguous(), go)
    out_f = fused(x)
    assert rel_err(out_f, out_r) < TOL[torch.float64]
    # A stride-0 upstream gradient (what .sum() hands back) is read in place too.
    xf = x.clone().requires_grad_()
    fused(xf).sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()
    assert rel_err(xf.grad, xr.grad) < TOL[torch.float64]


def test_dense_permuted_input_gives_contiguous_output(fused_on):
    """One layout rule for every provider and the fakes: channels_last in -> channels_last out,
    anything else -> contiguous, also for a dense permuted tensor (W and H swapped), whose strides
    a kernel could otherwise copy into its output."""
    backend, dev = fused_on
    ref, fused = pair(dict(dim=16, head_num=2), backend=backend, device=dev)
    x = torch.randn(2, 16, 23, 17, dtype=torch.float64, device=dev).transpose(2, 3)  # dense, not NCHW/NHWC
    go = torch.randn(x.shape, dtype=torch.float64, device=dev)
    out_r, dx_r, _ = run(ref, x, go)
    xf = x.clone().requires_grad_()
    out_f = fused(xf)
    dx_f, = torch.autograd.grad(out_f, xf, go)  # the op's own dX (x.grad would take x's strides)
    assert out_f.is_contiguous() and dx_f.is_contiguous()
    assert rel_err(out_f, out_r) < TOL[torch.float64] and rel_err(dx_f, dx_r) < TOL[torch.float64]


def test_gradcheck_autograd_function(fused_on):
    check_gradcheck(*fused_on)


def test_param_order_matches_module():
    named = dict(pair(dict(dim=8, qkv_bias=True))[1].named_parameters())
    assert set(PARAM_NAMES) == set(named)


@pytest.mark.parametrize("cfg,shape", [CONFIGS[3], CONFIGS[7]], ids=ids([CONFIGS[3], CONFIGS[7]]))
def test_deterministic(cfg, shape, fused_on):
    backend, dev = fused_on
    _, fused = pair(cfg, backend=backend, device=dev)
    fused = fused.float()
    x = torch.randn(shape, device=dev)
    go = torch.randn(shape, device=dev)
    first, second = run(fused, x, go), run(fused, x, go)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][n], second[2][n]) for n in first[2])


def test_empty_batch(fused_on):
    backend, dev = fused_on
    m = SCSA(16, backend=backend).to(dev)
    x = torch.randn(0, 16, 14, 14, device=dev, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_mixed_precision_parameters(fused_on):
    """fp32 parameters with a half input (what autocast-free AMP setups do): fp32 statistics,
    half output, parameter gradients in the parameters' dtype."""
    backend, dev = fused_on
    cfg = dict(dim=16, head_num=2)
    ref, fused = pair(cfg, backend=backend, device=dev)
    fused = fused.float()
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64, device=dev)
    go = torch.randn_like(x)
    out_r, dx_r, dp_r = run(ref, x, go)
    out_f, dx_f, dp_f = run(fused, x.half(), go)
    assert out_f.dtype == torch.float16 and all(g.dtype == torch.float32 for g in dp_f.values())
    assert rel_err(out_f, out_r) < TOL[torch.float16]
    assert rel_err(dx_f, dx_r) < TOL[torch.float16]

