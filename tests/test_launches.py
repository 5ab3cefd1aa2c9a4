"""Launch budget (issue: forward <= 5 launches and no full-size PyTorch op; backward <= 3
full-size launches), measured by recording every kernel launch and every aten op in between."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE, pair
from kernels import LaunchRecorder
from scsa_ops.ops.triton import utils

ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
               torch.ops.aten.empty_strided.default}


class FullSizeOps(TorchDispatchMode):
    """Records aten ops (outside kernel launches) whose output is as large as the input."""

    def __init__(self, numel, recorder):
        super().__init__()
        self.numel, self.recorder, self.ops = numel, recorder, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        big = any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in outs)
        if big and not self.recorder.active and func not in ALLOCATIONS:
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
    with FullSizeOps(x.numel(), rec) as mode:  # autograd.grad: no accumulation into x.grad by the engine
        torch.autograd.grad(out, [x, *fused.parameters()], g)
    assert rec.names() == ["_gate_grads_bwd_kernel", "_apply_gates_kernel"]
    assert rec.launches[1][2]["INPUT_GRAD"] is True
    assert mode.ops == [], mode.ops


def test_no_host_sync_in_forward(monkeypatch):
    """Nothing in the fused forward reads a device value on the host (CUDA-graph safe)."""
    def forbid(*a, **k):
        raise AssertionError("host read of a device value in the fused forward")

    _, fused = pair(dict(dim=16))
    x = torch.randn(1, 16, 14, 14, dtype=torch.float64, device=DEVICE)
    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbid)
    LaunchRecorder(monkeypatch, execute=False)  # kernels themselves are the interpreter's business
    fused(x)
