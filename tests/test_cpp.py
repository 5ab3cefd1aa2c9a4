"""The C++ CPU path beyond what test_fused.py holds every provider to: it is built and loaded here,
its ops pass torch.library.opcheck (torch.compile: tests/test_compile.py), both schedules
(sample-major and pass-major) agree, inputs are checked by the ops themselves, and a missing
binary is rebuilt with torch.utils.cpp_extension.load."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    TOL,
    DispatchedOps,
    assert_matches_reference,
    forward_args,
    grad_err,
    opcheck_ops,
    pair,
    rel_err,
    run,
)
from scsa_ops import SCSA, _build, reference
from scsa_ops.ops import cpp
from scsa_ops.ops.library import output_format


@pytest.fixture(scope="module")
def provider():
    provider, why = cpp.load()
    assert provider is not None, why  # `make test` builds the extension: its absence is a failure
    return provider


@pytest.mark.parametrize("channels_last", [False, True])
def test_intermediates_match_reference(provider, channels_last):
    """Each pass's output, not just the end result: p_h, p_w, a_h, a_w, Y and the logits o."""
    cfg = dict(dim=16, head_num=2, qkv_bias=True)
    ref, fused = pair(cfg, backend="cpp", device="cpu")
    x = torch.randn(3, 16, 17, 15, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out, ph, pw, ah, aw, y, o = torch.ops.scsa_cpp.forward(*forward_args(fused, x))
    convs = ref.convs()
    cw, cb = [c.weight for c in convs], [c.bias for c in convs]
    with torch.no_grad():
        ah_r = reference.spatial_gate(x.mean(3), cw, cb, ref.norm_h.weight, ref.norm_h.bias, "sigmoid")
        aw_r = reference.spatial_gate(x.mean(2), cw, cb, ref.norm_w.weight, ref.norm_w.bias, "sigmoid")
        y_r = torch.nn.functional.avg_pool2d(x * ah_r[..., None] * aw_r[:, :, None], 7)
        o_r = reference.channel_attention_logits(y_r, ref.norm.weight, ref.norm.bias,
                                                 (ref.q.weight, ref.k.weight, ref.v.weight),
                                                 (ref.q.bias, ref.k.bias, ref.v.bias), 2)
        out_r = ref(x)
    for got, want in [(ph, x.sum(3)), (pw[0], x.sum(2)), (ah, ah_r), (aw, aw_r), (y, y_r), (o, o_r), (out, out_r)]:
        assert rel_err(got, want) < TOL["fp64_pass"]
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("dim,head_num,shape", [
    (400, 2, (2, 400, 7, 9)),     # D = 200: key blocks of 8, 4 and 1 vectors; N = 1 (one window)
    (256, 1, (1, 256, 21, 14)),   # D = 256: two blocks of 8; N = 6 (even)
    (96, 3, (2, 96, 15, 22)),     # D = 32: a block of 2 singles; N = 6
    (64, 4, (1, 64, 21, 21)),     # D = 16; N = 9 (odd: the last key row on its own)
])
def test_channel_attention_blocks(provider, dim, head_num, shape):
    """The channel-attention pass scores keys in register blocks: every block size and parity of N,
    in fp64 and in fp32, against the reference logits."""
    ref, fused = pair(dict(dim=dim, head_num=head_num, qkv_bias=True), backend="cpp", device="cpu")
    x = torch.randn(shape, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        _, _, _, _, _, y, o = torch.ops.scsa_cpp.forward(*forward_args(fused.to(dtype), x.to(dtype)))
        with torch.no_grad():
            o_r = reference.channel_attention_logits(y.double(), ref.norm.weight, ref.norm.bias,
                                                     (ref.q.weight, ref.k.weight, ref.v.weight),
                                                     (ref.q.bias, ref.k.bias, ref.v.bias), head_num)
        assert rel_err(o, o_r) < tol, dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim,head_num,shape", [
    (400, 2, (1, 400, 14, 15)),  # D = 200 keys, N = 4: the attention's runs of 8 vectors, then a shorter one, partial
    (8, 1, (2, 8, 17, 150)),     # W = 150: gate_grads' runs of 8 vectors, then a partial one; leftover rows
    (16, 2, (2, 16, 14, 14)),    # 2 windows a row: U's window sums taken across the rows of a window row
    (36, 4, (2, 36, 14, 14)),    # D = 9: query rows in pairs, then one on its own
])
def test_backward_register_runs(provider, dim, head_num, shape, dtype):
    """The backward loops that hold their sums in registers over runs of up to 8 vectors (the channel
    attention's scores and dS for N > 1, two query rows at a time, gate_grads' R, S, V and U) on
    several runs, partial vectors, an odd head and leftover rows: forward, dx and every parameter
    gradient against the fp64 reference."""
    assert_matches_reference(dict(dim=dim, head_num=head_num, qkv_bias=True), shape, dtype, "cpp", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw,window_size", [
    ((9, 56), 7),   # 8 windows across both halves of a 64-column row
    ((5, 64), 4),   # 16 windows filling the row
    ((3, 16), 1),   # one-column windows
    ((7, 41), 3),   # 13 windows, two trailing columns dropped
    ((8, 15), 7),   # 2 windows: the scalar sums
])
def test_gated_pool_window_sums(provider, hw, window_size, dtype):
    """Y = avg_pool(X * a_h * a_w) from the op's own gates, for the window-row layouts the gated pool
    sums with register permutes (rows of <= 64 columns, 3-16 windows) and one it sums in scalars."""
    _, fused = pair(dict(dim=8, window_size=window_size), backend="cpp", device="cpu")
    x = torch.randn(2, 8, *hw, dtype=torch.float64).to(dtype)
    _, _, _, ah, aw, y, _ = torch.ops.scsa_cpp.forward(*forward_args(fused.to(dtype), x))
    want = torch.nn.functional.avg_pool2d(x.double() * ah.double()[..., None] * aw.double()[:, :, None],
                                          window_size)
    assert rel_err(y, want) < TOL["fp32_pass"]


@pytest.mark.parametrize("shape,window_size", [((2, 512, 7, 7), 7), ((2, 512, 9, 11), -1)])
def test_rank_one_attention(provider, shape, window_size):
    """N = 1 (7x7 maps under a 7x7 window, global pooling): fp32 rows with |x_i| * rad <= 3 take the
    power series of the key moments, the others the exponentials. Query weights spread from 0 to
    60 put rows of each head on both sides of that radius (asserted from the same quantities), and
    every row must match the fp64 reference logits."""
    ref, fused = pair(dict(dim=512, head_num=2, qkv_bias=True, window_size=window_size), backend="cpp",
                      device="cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref.q.weight.copy_(torch.linspace(0, 60, 512).view(512, 1, 1, 1)[torch.randperm(512, generator=g)])
    fused.load_state_dict(ref.state_dict())
    # fp32-representable, so that the reference sees the kernel's very input
    x = torch.randn(shape, dtype=torch.float64, generator=g).float().double()
    _, _, _, _, _, y, o = torch.ops.scsa_cpp.forward(*forward_args(fused.float(), x.float()))
    with torch.no_grad():
        y = y.double()
        params = ((ref.q.weight, ref.k.weight, ref.v.weight), (ref.q.bias, ref.k.bias, ref.v.bias))
        o_r = reference.channel_attention_logits(y, ref.norm.weight, ref.norm.bias, *params, 2)
        yn = reference._group_norm(y, 1, ref.norm.weight, ref.norm.bias).view(2, 2, 256)
        q, k = ((yn * w.view(2, 256) + b.view(2, 256)) for w, b in zip(params[0][:2], params[1][:2]))
        radius = (q / 256 ** 0.5).abs() * (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / 2
    inside = radius <= 3
    assert inside.sum(-1).min() > 10 and (~inside).sum(-1).min() > 10, "rows on both sides in every head"
    err = (o.double() - o_r).abs() / o_r.abs().amax(1, keepdim=True)
    # the exponential rows' scores reach ~100, whose fp32 rounding (~6e-6 absolute in an exponent)
    # alone moves a logit by ~1e-6: they are held to DESIGN.md's fp32 tolerance
    err = err.view(2, 2, 256)
    assert err[inside].max() < TOL["fp32_pass"] and err[~inside].max() < TOL[torch.float32]


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape,window_size", [((2, 512, 7, 7), 7), ((2, 512, 9, 11), -1)])
def test_rank_one_attention_backward(provider, shape, window_size, gate):
    """The backward's rank-one path: rows with |x_i| * rad <= 3 give dq, and their share of dk and
    dvbar, by power series; the others take the exponentials (the same weights as above put rows of
    each head on both sides). Every gradient against the fp64 reference: within the fp32 tolerance,
    or twice the fp32 eager module's error where the large scores make that the larger."""
    cfg = dict(dim=512, head_num=2, qkv_bias=True, window_size=window_size, gate_layer=gate)
    ref, fused = pair(cfg, backend="cpp", device="cpu")
    eager = SCSA(**cfg, backend="eager").double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref.q.weight.copy_(torch.linspace(0, 60, 512).view(512, 1, 1, 1)[torch.randperm(512, generator=g)])
    fused.load_state_dict(ref.state_dict())
    eager.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.float64, generator=g).float().double()
    go = torch.randn(shape, dtype=torch.float64, generator=g)
    _, dx_r, dp_r = run(ref, x, go)
    _, dx_f, dp_f = run(fused.float(), x.float(), go)
    _, dx_e, dp_e = run(eager.float(), x.float(), go)
    assert rel_err(dx_f, dx_r) <= max(TOL[torch.float32], 2 * rel_err(dx_e, dx_r))
    err_f, err_e = grad_err(dp_f, dp_r, 1e-2), grad_err(dp_e, dp_r, 1e-2)
    for name in err_f:
        assert err_f[name] <= max(TOL[torch.float32], 2 * err_e[name]), (name, err_f[name], err_e[name])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_major_and_pass_major_agree(provider, dtype, channels_last):
    """B >= 2 x threads runs sample-major (NCHW: F1-F3 a channel group at a time), smaller batches
    pass-major: every output of the op the same either way, and right. 40 channels: groups of 10,
    whose boundaries fall inside a vector."""
    cfg = dict(dim=40, head_num=4, gate_layer="softmax")
    ref, fused = pair(cfg, backend="cpp", device="cpu")
    x = torch.randn(3, 40, 15, 22).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = forward_args(fused.to(dtype), x)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):  # B = 3: sample-major on one thread, pass-major on two
            torch.set_num_threads(threads)
            runs.append(torch.ops.scsa_cpp.forward(*args))
    finally:
        torch.set_num_threads(old)
    for name, a, b in zip(("out", "p_h", "p_w", "a_h", "a_w", "Y", "o"), *runs):
        assert torch.equal(a, b), name
    with torch.no_grad():
        expected = ref.double()(x.double())
    assert rel_err(runs[0][0], expected) < 2 * TOL[dtype]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg,shape", [
    (dict(dim=16, head_num=2, qkv_bias=True), (2, 16, 17, 15)),
    (dict(dim=8, window_size=-1, gate_layer="softmax"), (3, 8, 6, 9)),
])
def test_opcheck(provider, cfg, shape, channels_last):
    """Schemas, fake implementations (shapes, strides, dtypes) and autograd registration agree with
    the kernels, for the forward op and both backward ops. opcheck's AOT-dispatch utilities would
    differentiate each op on its own; these ops are SCSAFunction's insides and refuse that by
    design, so tracing them through AOT autograd is tested on the whole module below instead."""
    _, fused = pair(cfg, backend="cpp", device="cpu")
    x = torch.randn(shape, dtype=torch.float32)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fused = fused.float()
    opcheck_ops(torch.ops.scsa_cpp, fused, x)


def _gradients(fused, x, g):
    return torch.autograd.grad(fused(x), [x, *fused.parameters()], g)


def test_backward_is_one_op_call(provider):
    """The whole backward is scsa_cpp::backward: no PyTorch compute op before or after it, only the
    split of its flat gradients into the parameters' shapes."""
    _, fused = pair(dict(dim=16, head_num=2, qkv_bias=True), backend="cpp", device="cpu")
    x = torch.randn(2, 16, 14, 15, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    _gradients(fused, x, g)
    out = fused(x)
    with DispatchedOps() as mode:
        torch.autograd.grad(out, [x, *fused.parameters()], g)
    assert [op for op in mode.ops if op != "aten.as_strided_.default"] == [
        "scsa_cpp.backward.default", "aten.unsafe_split_with_sizes.default"], mode.ops


@pytest.mark.parametrize("cfg,shape", [
    (dict(dim=32, head_num=4, qkv_bias=True), (5, 32, 15, 22)),
    (dict(dim=64, window_size=-1, gate_layer="softmax"), (3, 64, 7, 9)),
])
def test_backward_bitwise_across_threads(provider, cfg, shape):
    """Parameter gradients are per-sample partials summed over the batch in order: the same bits for
    1 and 2 threads and for repeated calls (no atomics, no thread-dependent reduction)."""
    _, fused = pair(cfg, backend="cpp", device="cpu")
    fused = fused.float()
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(_gradients(fused, x, g))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_fake_layout_rule():
    x = torch.empty(2, 8, 5, 5)
    assert output_format(x) == torch.contiguous_format
    assert output_format(x.to(memory_format=torch.channels_last)) == torch.channels_last
    assert output_format(x.transpose(2, 3)) == torch.contiguous_format  # other strides: copied to NCHW
    assert output_format(torch.empty(2, 1, 5, 5).to(memory_format=torch.channels_last)) == torch.contiguous_format


def test_ops_check_their_inputs(provider):
    _, fused = pair(dict(dim=8), backend="cpp", device="cpu")
    x = torch.randn(1, 8, 14, 14, dtype=torch.float64)
    args = list(forward_args(fused, x))
    with pytest.raises(RuntimeError, match="pooling window"):
        torch.ops.scsa_cpp.forward(*args[:-4], 15, 7, *args[-2:])
    args[1] = args[1][:3]
    with pytest.raises(RuntimeError, match="4 conv weights"):
        torch.ops.scsa_cpp.forward(*args)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        torch.ops.scsa_cpp.gate_grads(x[0], x[0], x, x, 7, 7)
    _, _, _, ah, aw, _, _ = torch.ops.scsa_cpp.forward(*forward_args(fused, x))
    with pytest.raises(RuntimeError, match="a_h must be Double"):
        torch.ops.scsa_cpp.gate_grads(x, x, ah.float(), aw, 7, 7)


def test_missing_binary_is_built_on_first_use(tmp_path):
    """The setup.py builds hidden: the package compiles csrc/ with cpp_extension.load, logs once,
    and the result runs. Built for a narrower instruction set than this CPU's where it has one
    (ATEN_CPU_CAPABILITY, as torch honours it), so those kernels run here too: at::vec's exp_u20
    returns inf for NaN, and AVX2 sigmoid gates once turned a NaN input into zeros."""
    cap = {"AVX512": "avx2", "AVX2": "default"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    script = (
        "import sys, logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        f"for name in {[_build.module_name(isa) for isa in _build.ISA_ORDER]!r}:\n"
        "    sys.modules[name] = None\n"  # makes `import` raise ImportError
        "from scsa_ops import SCSA\n"
        "from scsa_ops.ops import cpp\n"
        "provider, why = cpp.load()\n"
        "assert provider is not None, why\n"
        "m = SCSA(8, backend='cpp').double()\n"
        "x = torch.randn(2, 8, 9, 9, dtype=torch.float64)\n"
        "err = (m(x) - m.eager_forward(x)).abs().max().item()\n"
        f"assert err < {TOL[torch.float64]}, err\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    x = torch.randn(2, 8, 14, 14, dtype=dt)\n"
        "    x[0, 3, 2, 5] = float('nan')\n"
        "    out, ref = m.to(dt)(x), m.eager_forward(x)\n"
        "    assert torch.equal(out.isnan(), ref.isnan()), (dt, out.isnan().sum().item())\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), MAX_JOBS="2", ATEN_CPU_CAPABILITY=cap)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == cap.upper()
    assert proc.stderr.count("compiling the C++ extension with torch.utils.cpp_extension.load") == 1


def test_cpp_parameter_indices_follow_the_schema():
    """csrc's indices into the backward's per-parameter offsets (kConvW, ...) are schema.PARAM_NAMES'
    positions: one parameter order for Python and C++."""
    import re
    from pathlib import Path

    from scsa_ops import schema

    csrc = "\n".join(p.read_text() for p in sorted((Path(__file__).parents[1] / "csrc").glob("*.h")))
    (decl,) = re.findall(r"constexpr int (kConvW = .*?);", csrc)
    found = {name: int(value) for name, value in re.findall(r"(k\w+) = (\d+)", decl)}
    firsts = dict(kConvW=schema.CONV_WEIGHTS, kConvB=schema.CONV_BIASES, kNormH=schema.NORM_H, kNormW=schema.NORM_W,
                  kNormC=schema.NORM_C, kQkvW=schema.QKV_WEIGHTS, kQkvB=schema.QKV_BIASES)
    assert found == {k: schema.PARAM_NAMES.index(names[0]) for k, names in firsts.items()}
