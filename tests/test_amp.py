"""Mixed precision: under torch.autocast with a GradScaler training step the fused SCSA returns the
input's dtype, and its gradients are finite and match the eager module's. (The eager module's
output dtype follows autocast's op lists: on CUDA GroupNorm runs in fp32, so it returns fp32.)"""
import pytest
import torch
import torch.nn as nn

from helpers import FUSED, HAS_CUDA, TOL, grad_err, randomize_, rel_err
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


def _exact(x, target):
    """fp64 SCSA output and gradients of the same network, no autocast."""
    net = _net("eager", "cpu").double()
    seen = {}
    net[1].register_forward_hook(lambda m, i, o: seen.update(out=o))
    nn.functional.cross_entropy(net(x.cpu().double()), target.cpu()).backward()
    return seen["out"], {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=[f"{b}-{d}-{str(t)[6:]}" for b, d, t in CASES])
def test_autocast_gradscaler_step(backend, device, dtype):
    """Judged against fp64, within 2x the eager module's own error under the same autocast (plus
    the dtype's tolerance): fused and eager each round differently in 16 bits, and eager's bf16
    convolutions differ between CPUs (a 5% fused-vs-eager bound on a near-zero bias gradient
    failed on another machine), so comparing the two with each other is not a stable test."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 14, 14, generator=g).to(device)
    target = torch.randint(0, 10, (4,), generator=g).to(device)
    fused, eager = _net(backend, device), _net("eager", device)
    seen_f, grads_f = _step(fused, x, target, device, dtype)
    seen_e, grads_e = _step(eager, x, target, device, dtype)
    out_r, grads_r = _exact(x, target)
    assert seen_f["inp"] == dtype and seen_f["out"].dtype == dtype  # the input's dtype
    out_err_f, out_err_e = rel_err(seen_f["out"].cpu(), out_r), rel_err(seen_e["out"].cpu(), out_r)
    assert out_err_f <= 2 * out_err_e + TOL[dtype], (out_err_f, out_err_e)
    for name, g in grads_f.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    err_f = grad_err({n: g.cpu() for n, g in grads_f.items()}, grads_r, 1e-2)
    err_e = grad_err({n: g.cpu() for n, g in grads_e.items()}, grads_r, 1e-2)
    for name in grads_r:
        assert err_f[name] <= 2 * err_e[name] + TOL[dtype], (name, err_f[name], err_e[name])
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
