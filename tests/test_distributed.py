"""DistributedDataParallel with the fused SCSA: two CPU processes (gloo), one training step each on
half of a batch, give the gradients and parameters of one process stepping on the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from helpers import randomize_
from scsa_ops import SCSA


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SCSA(16, head_num=2, qkv_bias=True, backend="cpp"),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).double()
    randomize_(net[1], torch.Generator().manual_seed(1))
    return net


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 14, 14, dtype=torch.float64, generator=g), torch.randint(0, 5, (4,), generator=g)


def _step(net, x, y):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    nn.functional.cross_entropy(net(x), y).backward()
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    return grads


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = nn.parallel.DistributedDataParallel(_net())
    x, y = _batch()
    half = x.shape[0] // world
    grads = _step(net, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    if rank == 0:
        torch.save({"grads": grads, "params": net.module.state_dict()}, out_file)
    dist.barrier()
    # Leave without tearing the process group down: its destructor joins gloo's worker thread while
    # holding the GIL, and that thread may be freeing a finished work whose captured thread-local
    # state needs the GIL (a deadlock seen once in CI). The results are on disk and both ranks are
    # past the barrier, so nothing is lost.
    os._exit(0)


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    net = _net()
    grads = _step(net, *_batch())
    assert grads.keys() == ddp["grads"].keys() and any(n.startswith("1.") for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-10, atol=1e-12, msg=n)
    for n, p in net.state_dict().items():
        torch.testing.assert_close(ddp["params"][n], p, rtol=1e-10, atol=1e-12, msg=n)
