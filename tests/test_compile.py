"""torch.compile of models holding the fused SCSA: fullgraph (no graph break) forward and backward
for every provider, no recompilation per input size under dynamic=True, opcheck of the Triton ops,
and (without a GPU) proof that compiling the Triton path traces the kernels themselves."""
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

from helpers import HAS_CUDA, TOL, grad_err, needs_triton, opcheck_ops, pair, rel_err
from scsa_ops.backends import triton_provider
from scsa_ops.ops.triton.launches import LaunchRecorder

# Inductor where the provider's ops are real kernels on this machine; the interpreted Triton ops
# are traced the same way but run eagerly (aot_eager) to keep the interpreter's cost down.
COMPILE_BACKEND = {"cpp": "inductor", "triton": "inductor" if HAS_CUDA else "aot_eager"}



def _model_pair(backend, device):
    ref, fused = pair(dict(dim=16, head_num=2), backend=backend, device=device)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), fused.float()).to(device)
    twin = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), ref.float()).to(device)
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_fullgraph_forward_and_backward(fused_on):
    """No graph break (fullgraph=True), forward and backward traced through the registered ops and
    their fakes, the same numbers and gradients as the eager reference."""
    backend, device = fused_on
    torch._dynamo.reset()
    model, twin = _model_pair(backend, device)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND[backend])
    x = torch.randn(2, 16, 14, 14, device=device)
    out = compiled(x)
    out.square().sum().backward()
    twin(x).square().sum().backward()
    assert rel_err(out, twin(x)) < TOL[torch.float32]
    errs = grad_err({n: p.grad for n, p in model.named_parameters()}, {n: p.grad for n, p in twin.named_parameters()})
    assert max(errs.values()) < TOL["fp32_grad"], errs


# ResNet-like maps: square, multiples of the 7x7 window, batch 2-6.
SIZES = [(2, 14), (4, 21), (2, 28), (3, 35), (2, 42), (5, 56), (2, 49), (6, 63)]


def _triton_buckets(w, kw=7):
    """What the Triton launchers' tile shapes depend on: the row's and the window row's
    power-of-two widths (scsa_ops/ops/triton/utils.py)."""
    pow2 = lambda n: 1 << (n - 1).bit_length()  # noqa: E731
    return pow2(w), pow2(-(-w // kw))


def test_dynamic_shapes_do_not_recompile_per_size(fused_on, monkeypatch):
    backend, device = fused_on
    if backend == "triton" and not HAS_CUDA:
        LaunchRecorder(monkeypatch, execute=False)  # only compilations are counted: skip the interpreter
    torch._dynamo.reset()
    model, _ = _model_pair(backend, device)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for b, s in SIZES:  # the graph holds the backward too (the parameters need gradients)
        compiled(torch.randn(b, 16, s, s, device=device))
    # One graph (dynamo may trace the first one twice); the Triton tiles add one per new bucket.
    allowed = 2 if backend == "cpp" else 1 + len({_triton_buckets(s) for _, s in SIZES})
    assert counter.frame_count <= allowed < len(SIZES)


@needs_triton
@pytest.mark.parametrize("channels_last", [True])  # the layout rule's hard case; NCHW: test_cpp's opcheck
def test_triton_opcheck(channels_last):
    provider, why = triton_provider()
    assert provider is not None, why
    _, fused = pair(dict(dim=8, head_num=2, qkv_bias=True))
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64, device=fused.norm.weight.device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    opcheck_ops(torch.ops.scsa_triton, fused, x)


TRACE = r"""
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from scsa_ops import SCSA

graphs = []

class Captured(Exception):
    pass

def capture(gm, example_inputs):
    graphs.append(gm)
    def run(*args):
        raise Captured  # no GPU here: the kernels are compiled for one, never run
    return run

m = SCSA(16, head_num=2, backend="triton")
from scsa_ops.autograd import fused_scsa
from scsa_ops.backends import triton_provider
f = lambda x, *p: fused_scsa(x, p, m.config, triton_provider()[0])
compiled = torch.compile(f, fullgraph=True, dynamic=True,
                         backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
for shape in ((2, 16, 14, 14), (2, 16, 28, 14)):  # F1-F3 in one launch (group_forward), the separate passes
    try:
        compiled(torch.randn(shape, requires_grad=True), *m.state_dict_params())
    except Captured:
        pass
for g in graphs:
    print([kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in g.graph.nodes
           if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)])
"""


@needs_triton
def test_compiling_the_triton_path_traces_its_kernels():
    """Without the interpreter (a fresh process), the Triton ops are torch.library.triton_ops: AOT
    autograd decomposes them into the kernel launches themselves (wrap_triton), forward and
    backward, with symbolic shapes. Runs without a GPU: the captured graphs are only inspected."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", TRACE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    backward = str(["_gate_grads_bwd_kernel", "_channel_attention_bwd_kernel", "_spatial_gate_bwd_kernel",
                    "_param_grads_kernel", "_apply_gates_kernel"])
    assert lines == [str(["_group_fwd_kernel", "_channel_attention_fwd_kernel", "_poison_logits_kernel",
                          "_apply_gates_kernel"]), backward,
                     str(["_pool_fwd_kernel", "_spatial_gate_fwd_kernel", "_gated_pool_fwd_kernel",
                          "_channel_attention_fwd_kernel", "_poison_logits_kernel", "_apply_gates_kernel"]),
                     backward], \
        res.stdout + res.stderr[-2000:]
