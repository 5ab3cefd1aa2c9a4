"""Mixed precision: under torch.autocast with a GradScaler training step the fused SCSA returns the
input's dtype, and its gradients are finite and match the eager module's. (The eager module's
output dtype follows autocast's op lists: on CUDA GroupNorm runs in fp32, so it returns fp32.)"""
import pytest
import torch
import torch.nn as nn

from helpers import FUSED, HAS_CUDA, randomize_, rel_err
from scsa_ops import SCSA

CASES = [(b, d, torch.bfloat16) for b, d in FUSED if d == "cpu"]
if HAS_CUDA:
    CASES += [("triton", "cuda", torch.float16), ("triton", "cuda", torch.bfloat16)]


def _net(backend, device, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), SCSA(16, head_num=2, qkv_bias=True, backend=backend),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    randomize_(net[1], torch.Generator().manual_seed(seed))
    return net.to(device)


def _step(net, x, target, device, dtype):
    """One GradScaler training step under autocast; (SCSA output, gradients before the step)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device)
    seen = {}
    net[1].register_forward_hook(lambda m, i, o: seen.update(inp=i[0].dtype, out=o))
    with torch.autocast(device, dtype=dtype):
        loss = nn.functional.cross_entropy(net(x), target)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    scaler.step(opt)
    scaler.update()
    return seen, grads


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=[f"{b}-{d}-{str(t)[6:]}" for b, d, t in CASES])
def test_autocast_gradscaler_step(backend, device, dtype):
    x = torch.randn(4, 8, 14, 14, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    fused, eager = _net(backend, device), _net("eager", device)
    seen_f, grads_f = _step(fused, x, target, device, dtype)
    seen_e, grads_e = _step(eager, x, target, device, dtype)
    assert seen_f["inp"] == dtype and seen_f["out"].dtype == dtype  # the input's dtype
    assert rel_err(seen_f["out"].float(), seen_e["out"].float()) < 2e-2
    for name, g in grads_f.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert rel_err(g, grads_e[name]) < 5e-2, (name, rel_err(g, grads_e[name]))
    # the step was taken (finite gradients: the scaler did not skip it)
    assert not torch.equal(fused[1].q.weight, _net(backend, device)[1].q.weight)


def test_backward_inside_autocast_keeps_the_small_graphs_in_fp32():
    """A backward called inside the autocast region: gradients as good as one called outside."""
    x = torch.randn(2, 8, 14, 14)
    target = torch.randint(0, 10, (2,))
    grads = []
    for inside in (False, True):
        net = _net("cpp", "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), target)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
