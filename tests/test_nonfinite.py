"""No silent wrong results: NaN and Inf in the input land exactly where the eager module puts them
(output, dx and every parameter gradient: an AMP GradScaler skips a step by looking for them); with
a NaN or Inf in a parameter, every element the eager module makes non-finite is non-finite too
(the C++ forward exactly as eager, the rest NaN throughout, decided inside the ops with no host
read); parameters the kernels cannot read are a clear error naming them, missing biases act as the
eager convolution's, and a second derivative through the fused backward raises."""
import warnings

import pytest
import torch

from cases import NONFINITE_CASES, random_inputs
from helpers import (
    TOL,
    eager_and_fused,
    forward_backward,
    grad_err,
    nonfinite_mismatches,
    nonfinite_uncovered,
    pair,
    rel_err,
    run,
)
from scsa_ops import SCSA
from scsa_ops.schema import PARAM_NAMES

NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
# 1x1 and 2x2 maps: there the conv taps that reach past the map only ever see its zero padding, in
# both branches (which share the convs), and whether their weight gradient is NaN (the padding
# summed, NaN x 0) or 0 (only valid positions) is the eager conv's choice per kernel size and dtype
# (spatial_gate.padded_taps).
@pytest.mark.parametrize("cfg,shape,dtype", [(*NONFINITE_CASES[0], torch.float32),
                                             (*NONFINITE_CASES[0], torch.bfloat16),
                                             (*NONFINITE_CASES[1], torch.float32),
                                             (dict(dim=16, window_size=1), (2, 16, 1, 1), torch.float32),
                                             (dict(dim=16, window_size=-1), (2, 16, 2, 2), torch.bfloat16)],
                         ids=["sigmoid", "sigmoid-bf16", "softmax-one-window", "1x1", "2x2-bf16"])
def test_nonfinite_input(cfg, shape, dtype, value, fused_on):
    eager, fused = eager_and_fused(cfg, *fused_on, dtype)
    x, go = random_inputs(shape, dtype, fused_on[1])
    x[0, 3, min(2, shape[2] - 1), min(5, shape[3] - 1)] = value
    expected = forward_backward(eager, x, go)
    assert expected[0][1][0].isnan().all() and expected[0][1][1].isfinite().all()  # what eager does
    assert not nonfinite_mismatches(forward_backward(fused, x, go), expected)


@pytest.mark.parametrize("name,value", [(n, NONFINITE[i % 3]) for i, n in enumerate(PARAM_NAMES)],
                         ids=[f"{n}={NONFINITE[i % 3]}" for i, n in enumerate(PARAM_NAMES)])
def test_nonfinite_parameter(name, value, fused_on):
    """One element of each parameter in turn (NaN, Inf and -Inf in turn: the fuzz campaign tries
    the other combinations); fp32, where the formulation, not the dtype, decides. The C++ forward
    runs the eager module's own op sequence then (its output's NaN and Inf exactly where eager's
    are); every gradient, and the Triton output, is NaN throughout."""
    cfg, shape = NONFINITE_CASES[1] if name.endswith("bias") and name[0] in "qkv" else NONFINITE_CASES[0]
    eager, fused = eager_and_fused(cfg, *fused_on, torch.float32)
    for m in (eager, fused):
        with torch.no_grad():
            m.get_parameter(name).view(-1)[1] = value
    x, go = random_inputs(shape, torch.float32, fused_on[1])
    expected, actual = forward_backward(eager, x, go), forward_backward(fused, x, go)
    assert not nonfinite_uncovered(actual, expected)
    if fused_on[0] == "cpp":
        assert not nonfinite_mismatches(actual[:1], expected[:1])
    else:
        assert actual[0][1].isnan().all()
    assert all(t.isnan().all() for what, t in actual[1:]), [what for what, t in actual if not t.isnan().all()]
    # Decided anew at every call: back to finite, the fused numbers again.
    for m in (eager, fused):
        with torch.no_grad():
            m.get_parameter(name).view(-1)[1] = 0.5
    out = fused(x)
    assert out.isfinite().all() and torch.allclose(out, eager(x), atol=TOL[torch.float32])


@pytest.mark.parametrize("name", ["norm_h.weight", "v.weight"])  # a spatial and a channel parameter
def test_parameter_overflowing_in_a_dtype_conversion(name, fused_on):
    """module.float() converts the parameters through `.data`, which keeps each tensor and its version
    counter: a parameter of 1e300, finite in fp64, is Inf in fp32, and the ops see it (a check cached
    by tensor and version would not)."""
    cfg, shape = NONFINITE_CASES[0]
    eager, fused = eager_and_fused(cfg, *fused_on, torch.float64)
    for m in (eager, fused):
        with torch.no_grad():
            m.get_parameter(name).view(-1)[1] = 1e300
    x, go = random_inputs(shape, torch.float64, fused_on[1])
    forward_backward(fused, x, go)  # every parameter finite: the fused path, its answer cached
    eager, fused = eager.float(), fused.float()
    assert fused.get_parameter(name).isinf().any()
    x, go = x.float(), go.float()
    actual = forward_backward(fused, x, go)
    assert not nonfinite_uncovered(actual, forward_backward(eager, x, go))
    assert actual[1][1].isnan().all()


@pytest.mark.parametrize("weight", [1.05e38, 1.1e38, 1.2e38])
def test_softmax_gate_near_the_float_limit(weight, fused_on):
    """A finite GroupNorm weight so large that its logits times log2(e) overflow: the C++ softmax
    subtracted the row max in log2 units and made inf - inf = NaN where eager is finite."""
    cfg = dict(dim=16, gate_layer="softmax")
    eager, fused = eager_and_fused(cfg, *fused_on, torch.float32)
    for m in (eager, fused):
        with torch.no_grad():
            m.norm_h.weight[1] = weight
    x, _ = random_inputs((2, 16, 14, 14), torch.float32, fused_on[1])
    out_e, out_f = eager(x), fused(x)
    assert out_e.isfinite().all()
    assert out_f.isfinite().all() and torch.allclose(out_f, out_e, **TOL["fp32_close"])


def test_parameter_on_the_meta_device():
    """Built on the meta device, loaded with assign=True and a key missing: one parameter is still
    meta. A kernel reading it would return uninitialised memory: the call must raise instead."""
    with torch.device("meta"):
        m = SCSA(16, backend="cpp")
    sd = SCSA(16).state_dict()
    del sd["norm_h.weight"]
    m.load_state_dict(sd, assign=True, strict=False)
    with torch.no_grad(), pytest.raises(ValueError, match="'norm_h.weight' is on meta but the input is on cpu"):
        m(torch.randn(2, 16, 14, 14))


def test_parameter_on_another_device_or_not_floating(fused_on):
    backend, device = fused_on
    m = SCSA(16, backend=backend).to(device)
    m.v.weight = torch.nn.Parameter(m.v.weight.to("meta"))
    with pytest.raises(ValueError, match="'v.weight' is on meta"):
        m(torch.randn(1, 16, 7, 7, device=device))
    m = SCSA(16, backend=backend).to(device)
    m.norm.bias = torch.nn.Parameter(torch.zeros(16, dtype=torch.int64, device=device), requires_grad=False)
    with pytest.raises(TypeError, match="'norm.bias' must be floating point, got torch.int64"):
        m(torch.randn(1, 16, 7, 7, device=device))


def test_missing_biases_act_as_zero(fused_on):
    """register_parameter(name, None): fused with the bias (or GroupNorm weight) the eager ops use."""
    cfg, shape = dict(dim=16, head_num=2, qkv_bias=True), (2, 16, 9, 16)
    eager, fused = eager_and_fused(cfg, *fused_on, torch.float64)
    for m in (eager, fused):
        # (A GroupNorm weight of None beside a bias: torch's own group_norm backward fails on it.)
        for module, attr in (("global_dwc_s", "bias"), ("norm_w", "weight"), ("norm_w", "bias"), ("norm", "bias"),
                             ("k", "bias")):
            getattr(m, module).register_parameter(attr, None)
    x, go = random_inputs(shape, torch.float64, fused_on[1])
    expected, actual = forward_backward(eager, x, go), forward_backward(fused, x, go)
    for (what, a), (_, e) in zip(actual, expected):
        assert (a - e).abs().max() <= TOL["fp64_order"] * e.abs().max().clamp_min(1), what
    # Without the channel GroupNorm's weight (torch's group_norm has no backward for that with a bias).
    for m in (eager, fused):
        m.norm.register_parameter("weight", None)
    with torch.no_grad():
        assert (fused(x) - eager(x)).abs().max() <= TOL["fp64_order"]
    m = SCSA(16, backend=fused_on[0]).to(fused_on[1])
    m.q.register_parameter("weight", None)
    with pytest.raises(ValueError, match="'q.weight' is None"):
        m(x[:, :, :7, :7].float())


def test_double_backward_raises(fused_on):
    """The fused backward is not differentiable (its recomputed small tensors are constants, so a
    second derivative through it would be wrong): create_graph=True is a clear error."""
    backend, device = fused_on
    m = SCSA(16, backend=backend).double().to(device)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not twice differentiable.*backend='eager'"):
        torch.autograd.grad(m(x).square().sum(), [x, m.norm_h.weight], create_graph=True)
    first, = torch.autograd.grad(m(x).square().sum(), x)  # first order is unaffected
    assert first.isfinite().all()


def test_invalid_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("SCSA_OPS_BACKEND", "garbage")
    for backend in ("auto", "eager"):
        match = r"SCSA_OPS_BACKEND names an unknown backend 'garbage'.*'auto', 'triton', 'cpp', 'eager'"
        with pytest.raises(ValueError, match=match):
            SCSA(8, backend=backend)(torch.randn(1, 8, 7, 7))
    monkeypatch.setenv("SCSA_OPS_BACKEND", "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SCSA(8, backend="cpp")(torch.randn(1, 8, 7, 7)).shape == (1, 8, 7, 7)


# The last: a channel group too big for one Triton tile (its statistics take two sweeps).
@pytest.mark.parametrize("cfg,shape,scale", [(*NONFINITE_CASES[0], 1e20), (*NONFINITE_CASES[0], 1e30),
                                             (*NONFINITE_CASES[1], 1e20), (*NONFINITE_CASES[1], 1e30),
                                             (dict(dim=64), (1, 64, 8, 128), 1e20)],
                         ids=["sigmoid-1e20", "sigmoid-1e30", "softmax-one-window-1e20", "softmax-one-window-1e30",
                              "group-in-sweeps-1e20"])
def test_finite_input_whose_squares_overflow(cfg, shape, scale, fused_on):
    """A finite fp32 input around 1e20-1e30: the GroupNorm deviations' fp32 squares overflow though
    the variance is finite in fp64. Taken as they come, rstd = 0 gives wrong gates with no NaN to
    show it (eager fp32 returns NaN there, or at 1e20 such wrong numbers).
    The C++ path sums those squares again in fp64 and gives the fp64 reference's output and
    gradients; the Triton path makes the statistics NaN (a second sweep spilled a bf16 kernel)."""
    backend, device = fused_on
    ref, fused = pair(cfg, backend=backend, device=device)
    x, go = random_inputs(shape, torch.float32, device)
    x = x * scale
    out_r, dx_r, dp_r = run(ref, x.double(), go.double())
    out_f, dx_f, dp_f = run(fused.float(), x, go)
    assert all(t.isfinite().all() for t in (out_r, dx_r, *dp_r.values()))
    if backend == "triton":
        assert out_f.isnan().all() and dx_f.isnan().all()
        return
    assert rel_err(out_f, out_r) < TOL[torch.float32]
    assert rel_err(dx_f, dx_r) < TOL[torch.float32]
    errs = grad_err(dp_f, dp_r, 1e-2)
    assert max(errs.values()) < 10 * TOL[torch.float32], errs
