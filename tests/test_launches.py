"""Launch budget (forward and backward: 5 launches each, no PyTorch compute op between them),
measured by recording every kernel launch and every aten op in between."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.kernels import LaunchRecorder
from helpers import DEVICE, FUSED, HAS_CUDA, pair
from scsa_ops.ops.triton import utils
from scsa_ops.ops.triton.apply_gates import input_grad
from scsa_ops.ops.triton.backward import backward
from scsa_ops.ops.triton.forward import forward
from scsa_ops.ops.triton.gate_grads import gate_grads

# The launchers behind the ops scsa_triton::*: the mode runs them itself to see every op inside.
LAUNCHERS = {"forward": forward, "backward": backward, "gate_grads": gate_grads, "input_grad": input_grad}
ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
               torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty.default}
# What splits the backward op's flat gradients into the parameters' shapes: views, no compute.
VIEWS = {torch.ops.aten.split_with_sizes.default, torch.ops.aten.view.default}


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
        if big and not self.recorder.active and func not in ALLOCATIONS | VIEWS:
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
                           "_channel_attention_fwd_kernel", "_apply_gates_kernel"]
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


def test_float_arguments_are_typed_fp64(monkeypatch):
    """Every float argument of every launch reaches the kernel as fp64: the GPU JIT types an
    unannotated Python float fp32 (triton.runtime.jit.mangle_type), which rounds eps = 1e-5 in fp64
    runs and moved results off the official golden vectors by 2e-10. The interpreter passes the
    Python float itself, so only this check, with the JIT's own typing rule, sees it on a CPU."""
    import inspect

    from triton.runtime.jit import KernelParam, mangle_type

    from bench.kernels import all_kernels

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
