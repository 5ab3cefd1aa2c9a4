"""Launch budget (forward and backward: 5 launches each, no PyTorch compute op between them),
measured by recording every kernel launch and every aten op in between."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE, FUSED, HAS_CUDA, TOL, DispatchedOps, pair, rel_err
from scsa_ops import SCSA
from scsa_ops.ops.triton import utils
from scsa_ops.ops.triton.apply_gates import input_grad
from scsa_ops.ops.triton.backward import backward
from scsa_ops.ops.triton.forward import forward
from scsa_ops.ops.triton.gate_grads import gate_grads
from scsa_ops.ops.triton.launches import LaunchRecorder

# The launchers behind the ops scsa_triton::*: the mode runs them itself to see every op inside.
LAUNCHERS = {"forward": forward, "backward": backward, "gate_grads": gate_grads, "input_grad": input_grad}
ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
               torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty.default}
# What cuts the backward op's flat gradients into the parameters' shapes: no compute.
GRADIENT_SPLIT = {torch.ops.aten.unsafe_split_with_sizes.default, torch.ops.aten.as_strided_.default}


class FullSizeOps(TorchDispatchMode):
    """Records aten ops (outside kernel launches, not allocations or views) whose output has at
    least `numel` elements (0: every op)."""

    def __init__(self, numel, recorder):
        super().__init__()
        self.numel, self.recorder, self.ops = numel, recorder, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "scsa_triton":
            with self:
                return LAUNCHERS[func._opname](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        big = any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in outs)
        if big and not self.recorder.active and func not in ALLOCATIONS | GRADIENT_SPLIT:
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("cfg", [dict(dim=16, head_num=2), dict(dim=16, window_size=-1, gate_layer="softmax")])
def test_launch_budget(monkeypatch, cfg):
    monkeypatch.setattr(utils, "_POISON", False)  # a NaN fill would be a full-size op of the test's own
    rec = LaunchRecorder(monkeypatch)
    _, fused = pair(cfg)
    fused = fused.float()
    x = torch.randn(2, 16, 15, 17, device=DEVICE, requires_grad=True)
    with FullSizeOps(x.numel(), rec) as mode:
        out = fused(x)
    assert rec.names() == ["_pool_fwd_kernel", "_spatial_gate_fwd_kernel", "_gated_pool_fwd_kernel",
                           "_channel_attention_fwd_kernel", "_poison_logits_kernel", "_apply_gates_kernel"]
    assert mode.ops == [], mode.ops
    rec.launches.clear()
    g = torch.randn_like(out)
    with FullSizeOps(0, rec) as mode:  # autograd.grad: no accumulation into x.grad by the engine
        torch.autograd.grad(out, [x, *fused.parameters()], g)
    assert rec.names() == ["_gate_grads_bwd_kernel", "_channel_attention_bwd_kernel", "_spatial_gate_bwd_kernel",
                           "_param_grads_kernel", "_apply_gates_kernel"]
    assert rec.launches[4][2]["INPUT_GRAD"] is True
    assert mode.ops == [], mode.ops


@pytest.mark.parametrize("backend,device", FUSED, ids=[b for b, _ in FUSED])
def test_no_host_sync_in_forward(monkeypatch, backend, device):
    """Nothing on the fused forward's Python path reads a device value on the host or branches on
    one (so it can be captured in a CUDA graph); the C++ op is one call with no such reads."""
    def forbid(*a, **k):
        raise AssertionError("host read of a device value in the fused forward")

    _, fused = pair(dict(dim=16), backend=backend, device=device)
    x = torch.randn(1, 16, 14, 14, dtype=torch.float64, device=device)
    fused(x)  # the provider is loaded (imports, a JIT build) before the check
    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbid)
    if backend == "triton":
        LaunchRecorder(monkeypatch, execute=False)  # the interpreter itself reads values on the host
    fused(x)


# The ops that read a tensor's value on the host (a GPU synchronisation), by overload packet.
HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal"}


@pytest.mark.parametrize("backend,device", FUSED, ids=[b for b, _ in FUSED])
def test_no_host_read_in_a_training_step(monkeypatch, backend, device):
    """Forward, backward and an SGD step of a model holding the fused SCSA read no device value on
    the host, with the parameters' versions new at every step (no check is cached between steps)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), SCSA(16, head_num=2, backend=backend)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 8, 14, 14, device=device)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()  # the provider is loaded (imports, a JIT build, the first compile on a GPU) before the count
    if backend == "triton" and not HAS_CUDA:
        LaunchRecorder(monkeypatch, execute=False)  # the interpreter itself reads values on the host
    with DispatchedOps() as mode:
        for _ in range(2):
            step()
    assert [op for op in mode.ops if op.rsplit(".", 1)[0] in HOST_READS] == []


@pytest.mark.skipif(not HAS_CUDA, reason="torch.cuda.set_sync_debug_mode needs a GPU")
def test_no_cuda_sync_in_a_training_step():
    """The same rule by torch's own check on a GPU: under set_sync_debug_mode("error") every
    synchronising CUDA call raises, here across forward, backward and an SGD step with momentum of
    a model holding the fused SCSA (the Triton path), the parameters new at every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), SCSA(32, head_num=4, backend="triton")).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 16, 28, 28, device="cuda")

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()  # the kernels are compiled and the momentum buffers made before the check
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_and_replay():
    _, fused = pair(dict(dim=64, head_num=4), backend="triton", device="cuda")
    fused = fused.half().eval()
    static = torch.randn(8, 64, 28, 28, device="cuda", dtype=torch.half)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            fused(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fused(static)
    fresh = torch.randn_like(static)
    static.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        assert torch.equal(out, fused(fresh))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_of_a_training_step():
    """The forward and the backward of a model holding the fused SCSA captured as CUDA graphs
    (make_graphed_callables), replayed for steps of SGD: the parameters follow the eager model's."""
    def build(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), SCSA(32, head_num=4, backend=backend))
        return model.cuda()

    model, twin = build("triton"), build("eager")
    graphed = torch.cuda.make_graphed_callables(model, (torch.randn(4, 16, 28, 28, device="cuda"),))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for _ in range(3):
        x = torch.randn(4, 16, 28, 28, device="cuda")
        for m, opt in zip((graphed, twin), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p, q) < TOL["fp32_grad"], name


def test_float_arguments_are_typed_fp64(monkeypatch):
    """Every float argument of every launch reaches the kernel as fp64: the GPU JIT types an
    unannotated Python float fp32 (triton.runtime.jit.mangle_type), which rounds eps = 1e-5 in fp64
    runs and moved results off the official golden vectors by 2e-10. The interpreter passes the
    Python float itself, so only this check, with the JIT's own typing rule, sees it on a CPU."""
    import inspect

    from triton.runtime.jit import KernelParam, mangle_type

    from scsa_ops.ops.triton.launches import all_kernels

    rec = LaunchRecorder(monkeypatch, execute=False)
    for cfg in (dict(dim=16, head_num=2), dict(dim=16, window_size=-1, gate_layer="softmax")):
        _, fused = pair(cfg)
        x = torch.randn(2, 16, 14, 14, dtype=torch.float64, device=DEVICE, requires_grad=True)
        fused(x).sum().backward()
    kernels = all_kernels()
    floats = []
    for name, args, _ in rec.launches:
        params = inspect.signature(kernels[name].fn).parameters.values()
        for i, (param, value) in enumerate(zip(params, args)):
            if isinstance(value, float):
                typed = KernelParam(i, param, False, False).annotation_type or mangle_type(value)
                floats.append((name, param.name, typed))
    assert floats and all(typed == "fp64" for *_, typed in floats), floats


def test_vector_width_claims_only_what_holds():
    """utils.vector_width is the one place the kernels learn an alignment the JIT cannot see (their
    `aligned` hints turn it into a promise to the compiler): the widest power of two, up to 16
    bytes, dividing the row lengths and every stride but the unit one; 1 without a unit W stride."""
    def width(widths, *tensors):
        return utils.vector_width(widths, tensors[0].element_size(), *(t.stride() for t in tensors))

    x16 = torch.empty(2, 16, 14, 56, dtype=torch.float16)
    assert width((56,), x16) == 8  # 128-bit accesses
    assert width((56,), x16.float()) == 4
    assert width((56,), x16.double()) == 2
    assert width((28,), torch.empty(2, 16, 14, 28, dtype=torch.float16)) == 4
    assert width((7,), torch.empty(2, 16, 7, 7, dtype=torch.float16)) == 1
    assert width((56, 49), x16) == 1  # a second row length that is odd
    assert width((56,), x16, x16.contiguous(memory_format=torch.channels_last)) == 1
    assert width((56,), torch.empty(2, 16, 14, 57, dtype=torch.float16)[..., :56]) == 1  # row stride 57
    assert width((56,), torch.empty(2, 16, 14, 60, dtype=torch.float16)[..., :56]) == 4
    assert width((56,), x16[:, 1:]) == 8  # an offset view: its pointer alignment is the JIT's to judge
    assert width((56,), torch.ones(1).expand(2, 16, 14, 56)) == 1  # stride 0 along W: not contiguous


@pytest.mark.parametrize("row_stride", [16, 17, 18, 20, 24], ids=lambda s: f"row_stride={s}")
def test_rows_of_any_alignment(row_stride):
    """An fp32 W = 16 map read in place through rows of `row_stride` elements (a slice of a wider
    tensor, at a channel offset): the alignment the launchers claim (vector_width: 4, 2 or 1
    elements here) must hold, or the interpreter, which runs the hints' arithmetic too, reads other
    rows. Forward and input gradient against the fp64 reference."""
    ref, fused = pair(dict(dim=8, window_size=4))
    fused.float()
    base = torch.randn(2, 9, 12, row_stride, dtype=torch.float64, device=DEVICE)
    go = torch.randn(2, 8, 12, 16, dtype=torch.float64, device=DEVICE)
    xr = base[:, 1:, :, :16].contiguous().requires_grad_()
    ref(xr).backward(go)
    leaf = base.float().requires_grad_()
    x = leaf[:, 1:, :, :16]
    assert x.stride() == (9 * 12 * row_stride, 12 * row_stride, row_stride, 1)
    out = fused(x)
    out.backward(go.float())
    with torch.no_grad():
        assert rel_err(out.double(), ref(xr)) < TOL[torch.float32]
    assert rel_err(leaf.grad[:, 1:, :, :16].double(), xr.grad) < TOL[torch.float32]


def test_launchers_keep_no_reference_to_their_inputs():
    """The launch-parameter caches (utils.memo) hold ints and dtypes, never a tensor: an input
    held by a cache would keep a full-size activation alive after every call (and answer for a
    later tensor that reuses its id)."""
    import gc
    import weakref

    _, fused = pair(dict(dim=8))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 8, 14, 14, dtype=torch.float64, device=DEVICE).contiguous(memory_format=memory_format)
        x.requires_grad_()
        fused(x).sum().backward()
        alive = weakref.ref(x)
        del x
        gc.collect()
        assert alive() is None, memory_format
