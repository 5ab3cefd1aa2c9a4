import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scsa_ops import SCSA, backends, reference
from scsa_ops.autograd import SCSAFunction
from scsa_ops.reference import SCSA as Reference
from scsa_ops.schema import op_args

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Every fused provider this machine can run, with the device its tensors live on: Triton on CUDA
# (or its interpreter on CPU tensors) where the installed triton runs the kernels (not the triton
# torch 2.6 pins: tests/test_backends.py checks what happens there), the C++ path on CPU tensors.
FUSED = ([] if backends.TRITON_TOO_OLD else [("triton", DEVICE)]) + [("cpp", "cpu")]
needs_triton = pytest.mark.skipif(backends.TRITON_TOO_OLD is not None, reason=str(backends.TRITON_TOO_OLD))
# Every tolerance the tests use. By dtype: ||out - ref|| / ||ref|| of a fused result against the fp64
# reference (DESIGN.md section 4). The named ones, for what the dtype rule does not describe:
TOL = {
    torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2,
    "golden": 1e-10,  # against the official module's fp64 vectors, which sum in another order
    "fp64_grad": 1e-11,  # fp64 parameter gradients, and fp64 through a network: more sums, more roundoff
    "fp64_order": 1e-10,  # fp64 sums split or ordered otherwise (other ops, threads, ranks), norm-relative
    "fp64_pass": 1e-13,  # one fp64 pass against the same sums in fp64 torch ops
    "fp32_pass": 1e-6,  # one fp32 pass against fp64 torch ops on its own inputs: a few fp32 roundings
    "fp32_grad": 1e-4,  # fp32 parameter gradients and parameters after steps (sums over the batch)
    # torch.testing.assert_close / torch.allclose arguments
    "fp64_close": dict(rtol=1e-10, atol=1e-12),  # fp64, sums ordered otherwise (ranks, another backend)
    "fp64_network_close": dict(rtol=1e-8, atol=1e-12),  # fp64 gradients through ResNet-50's ~50 layers
    "fp32_close": dict(rtol=1e-4, atol=1e-5),  # fp32 training steps, other op orders
    "detection_close": dict(rtol=1e-4, atol=1e-3),  # fp32 YOLO outputs: boxes in pixels up to the image size
    "gradcheck": dict(eps=1e-6, atol=1e-7),  # torch.autograd.gradcheck's finite differences, fp64
}


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


def eager_and_fused(cfg, backend, device, dtype, seed=0):
    """(eager module, fused module) in `dtype` with the same random parameters as pair()."""
    ref, fused = pair(cfg, seed=seed, backend=backend, device=device)
    eager = SCSA(**cfg, backend="eager").double().to(device)
    eager.load_state_dict(ref.state_dict())
    return eager.to(dtype), fused.to(dtype)


def run(module, x, grad_out):
    """Forward + backward of (out * grad_out).sum(): (out, dx, {name: dparam})."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def grad_err(actual, expected, floor=1e-3):
    """Relative error of every parameter gradient, with a floor (a fraction of the largest
    gradient's norm) for gradients that are zero or nearly so in exact arithmetic (e.g. norm_h.bias
    under a softmax gate, which is shift-invariant)."""
    scale = max(g.norm().item() for g in expected.values())
    return {n: (actual[n].double() - expected[n].double()).norm().item()
            / max(expected[n].norm().item(), floor * scale) for n in expected}


def assert_matches_reference(cfg, shape, dtype, backend, device, channels_last=False, seed=0):
    """The fused module against the fp64 reference, forward, dx and every parameter gradient, on
    random data and parameters. fp64: agreement to ~1e-11. Lower precisions: DESIGN.md's tolerance,
    and (flash-attention's rule) within 2x the error of the same-precision eager module, both
    widened by the error that exact arithmetic makes on the same inputs rounded to `dtype`: an
    ill-conditioned result can move by 10x the rounding of its inputs (1x1 maps, tiny heads), and
    the eager module may land closer by luck (found by tests/test_fuzz.py; see
    test_fused.test_error_bound_includes_input_rounding). Gradients 100x smaller than the largest
    are judged against 1% of its norm, with 4x the dtype's tolerance as absolute slack (fp32 too:
    a 1x1 map's gradients amplify internal roundoff, and 2x eager's error is then a coin toss)."""
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
        assert max(errs.values()) < TOL["fp64_grad"], errs
        return out_f, dx_f
    errs = input_rounding_errors(cfg, seed, device, dtype, x, go, (out_r, dx_r, dp_r))
    eager = pair(cfg, seed=seed, backend="eager", device=device)[1].to(dtype).eval()
    out_e, dx_e, dp_e = run(eager, x.to(dtype), go)
    for what, f, e, r, rounding in (("out", out_f, out_e, out_r, errs[0]), ("dx", dx_f, dx_e, dx_r, errs[1])):
        err = rel_err(f, r)
        assert err < max(TOL[dtype], 2 * rounding), (what, err, rounding)
        assert err <= 2 * rel_err(e, r) + 2 * rounding + 1e-6, (what, err, rel_err(e, r), rounding)
    e_f, e_e = grad_err(dp_f, dp_r, 1e-2), grad_err(dp_e, dp_r, 1e-2)
    for n in e_f:
        bound = 2 * e_e[n] + 2 * errs[2][n] + 4 * TOL[dtype] + 1e-5
        assert e_f[n] <= bound, (n, e_f[n], e_e[n], errs[2][n])
    return out_f, dx_f


def input_rounding_errors(cfg, seed, device, dtype, x, go, exact):
    """Errors (out, dx, {param: grad error}) of exact (fp64) arithmetic on x, the upstream gradient
    and the parameters rounded to `dtype`, against `exact` = run() of the fp64 reference."""
    rounded = pair(cfg, seed=seed, backend="eager", device=device)[0].to(dtype).double().eval()
    out, dx, dp = run(rounded, x.to(dtype).double(), go.to(dtype).double())
    return rel_err(out, exact[0]), rel_err(dx, exact[1]), grad_err(dp, exact[2], 1e-2)


def spatial_gate_condition(cfg, seed, shape):
    """max |z| / std(z) over the spatial gate's GroupNorm groups (z: the conv outputs, on the input
    assert_matches_reference draws): normalising amplifies a one-ulp rounding of z by this factor."""
    ref = pair(cfg, seed=seed, backend="eager", device="cpu")[0]
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    worst = 0.0
    with torch.no_grad():
        for p in (x.mean(3), x.mean(2)):
            z = torch.cat([F.conv1d(pg, c.weight, c.bias, padding=c.weight.shape[-1] // 2, groups=pg.shape[1])
                           for pg, c in zip(p.chunk(4, dim=1), ref.convs())], dim=1)
            z = z.view(z.shape[0], 4, -1)
            worst = max(worst, (z.abs().amax(-1) / z.std(-1, unbiased=False).clamp_min(1e-300)).max().item())
    return worst


def forward_backward(module, x, grad_out):
    """[(what, tensor)] of run(): the output, dx and every parameter gradient, by name."""
    out, dx, grads = run(module, x, grad_out)
    return [("out", out), ("dx", dx)] + [(f"grad {n}", g) for n, g in grads.items()]


def nonfinite_mismatches(actual, expected):
    """Where two forward_backward() results put NaN or Inf differently: [(what, NaN count, Inf
    count of actual, the same of expected)], empty when every mask agrees."""
    return [(what, a.isnan().sum().item(), a.isinf().sum().item(), e.isnan().sum().item(), e.isinf().sum().item())
            for (what, a), (_, e) in zip(actual, expected)
            if not (torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf()))]


def nonfinite_uncovered(actual, expected):
    """Where `expected` (the eager module's forward_backward()) has a NaN or Inf and `actual` a
    finite number: [(what, how many)], empty when every non-finite element is non-finite in actual
    too. What a non-finite parameter must give: no finite number where eager has none (the fused
    paths may make more elements NaN then; finite parameters are held to nonfinite_mismatches)."""
    return [(what, (~e.isfinite() & a.isfinite()).sum().item()) for (what, a), (_, e) in zip(actual, expected)
            if (~e.isfinite() & a.isfinite()).any()]


# torch.library.opcheck's utilities that apply to SCSAFunction's inside ops (the AOT-dispatch ones
# would differentiate each op on its own, which they refuse by design).
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def forward_args(module, x):
    """The arguments of the `forward` op (either namespace) for a module's configuration."""
    kh, kw = reference.window_of(module.window_size, *x.shape[2:])
    return (x, *op_args(module.state_dict_params()), module.head_num, kh, kw, module.gate_layer == "softmax",
            reference.EPS)


def opcheck_ops(ops, module, x):
    """torch.library.opcheck of forward, gate_grads, input_grad and (where the namespace has it)
    backward of the namespace `ops`."""
    args = forward_args(module, x)
    kh, kw, softmax = args[-4:-1]
    torch.library.opcheck(ops.forward.default, args, test_utils=OPCHECKS)
    out, ph, pw, ah, aw, y, o = ops.forward(*args)
    g = torch.randn_like(out)
    torch.library.opcheck(ops.gate_grads.default, (g, x, ah, aw, kh, kw), test_utils=OPCHECKS)
    dy, dph, dpw = torch.randn_like(y), torch.randn_like(ah), torch.randn_like(aw)
    torch.library.opcheck(ops.input_grad.default, (g, x, ah, aw, o, dy, dph, dpw, kh, kw, softmax),
                          test_utils=OPCHECKS)
    if hasattr(ops, "backward"):
        for input_grad in (True, False):
            torch.library.opcheck(ops.backward.default, (g, *args[:-5], ph, pw, ah, aw, y, o, *args[-5:], input_grad),
                                  test_utils=OPCHECKS)


class DispatchedOps(TorchDispatchMode):
    """Records the name of every op dispatched while active (`with DispatchedOps() as ops:`)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def check_low_precision(cfg, shape, dtype, channels_last, backend, device):
    """assert_matches_reference, and the output and input gradient keep the input's memory format."""
    out, dx = assert_matches_reference(cfg, shape, dtype, backend, device, channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert dx.is_contiguous(memory_format=torch.channels_last) == channels_last


def check_gradcheck(backend, dev):
    """fp64 gradcheck of SCSAFunction (fast mode) through x and every parameter at once."""
    cfg = dict(dim=8, head_num=2, qkv_bias=True, window_size=3, gate_layer="softmax")
    _, fused = pair(cfg, backend=backend, device=dev)
    x = torch.randn(1, 8, 7, 8, dtype=torch.float64, device=dev, requires_grad=True)
    params = fused.state_dict_params()
    provider = backends.resolve(backend, x.device, True)
    # Every parameter in one flat input: fast mode then checks one random direction through all of
    # them (two inputs, a handful of calls: the interpreter's backward takes seconds per call).
    flat = torch.cat([p.detach().flatten() for p in params]).requires_grad_()

    def fn(x, flat):
        pieces = flat.split([p.numel() for p in params])
        return SCSAFunction.apply(x, provider, fused.config, *[t.view(p.shape) for t, p in zip(pieces, params)])

    assert torch.autograd.gradcheck(fn, (x, flat), fast_mode=True)


def check_matches_official(case, backend):
    """A golden case (cases.GOLDEN) through `backend` ('reference': the reference class itself):
    output, dx and every parameter gradient within 1e-10 of the official module's."""
    cls = reference.SCSA if backend == "reference" else SCSA
    kwargs = {} if backend == "reference" else {"backend": backend}
    dev = "cpu" if backend == "cpp" else DEVICE
    m = cls(**case["config"], **kwargs).double().to(dev)
    m.load_state_dict(case["state_dict"], strict=True)  # official names and shapes
    out, dx, dparams = run(m, case["x"].to(dev), case["grad_out"].to(dev))
    assert rel_err(out, case["out"]) < TOL["golden"]
    assert rel_err(dx, case["grad_x"]) < TOL["golden"]
    assert set(dparams) == set(case["grad_params"])
    errs = grad_err(dparams, {n: g.to(dev) for n, g in case["grad_params"].items()})
    assert max(errs.values()) < TOL["golden"], errs
