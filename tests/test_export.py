"""Deployment, no convert step: torch.export of the eager and the fused module with dynamic H and
W; torch.jit.trace + save of a fused model and torch.jit.load in a fresh process; an AOTInductor
package of the exported fused model loaded in a fresh process; ONNX (dynamo exporter, the fused
module decomposed to the reference math) run in onnxruntime. Dynamic ranges start at two windows
(H' W' >= 2): torch's shape reasoning guards a pooled map of a single window (N = 1) out of the
dynamic graph."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

from helpers import TOL, needs_triton, randomize_, rel_err
from scsa_ops import SCSA
from scsa_ops.ops import cpp
from scsa_ops.reference import SCSA as Reference

SIZES = [(14, 21), (28, 28), (15, 50)]
# Before torch 2.13 (seen on 2.6 and 2.11), export guards the eager module's avg_pool2d output size on
# H and W being multiples of the window (the fused op's fake has no such guard).
POOL_GUARD = torch.__version__ < "2.13"
# torch 2.6's ONNX exporter does not say it is exporting (torch.onnx.is_in_onnx_export() stays False).
TORCH_2_6 = torch.__version__ < "2.7"

needs_cpp = pytest.mark.skipif(cpp.load()[0] is None, reason="the C++ extension is unavailable")


def _dims(window=7):
    return {2: Dim("h", min=2 * window, max=1024), 3: Dim("w", min=2 * window, max=1024)}


def _reference():
    return randomize_(Reference(16, head_num=2, qkv_bias=True, gate_layer="softmax")).eval()


def _fused_model(window_size=7, backend="cpp"):
    """What a user deploys: SCSA between convolutions, fused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                          SCSA(16, head_num=4, qkv_bias=True, window_size=window_size, backend=backend),
                          nn.Conv2d(16, 8, 1)).eval()
    randomize_(model[1])
    return model


def _eager_twin(model):
    """The same model with the eager module: the deployed output must match it, not only itself."""
    twin = nn.Sequential(*model).eval()
    twin[1] = Reference(16, head_num=4, qkv_bias=True, window_size=model[1].window_size).eval()
    twin[1].load_state_dict(model[1].state_dict())
    return twin


def _in_fresh_process(script, tmp_path):
    """Run `script` in a new interpreter (nothing of this process's registrations carried over)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _sizes_and_expected(model, tmp_path):
    torch.manual_seed(1)
    inputs = [torch.randn(2, 3, 28, 35), torch.randn(2, 3, 14, 49)]
    with torch.no_grad():
        expected = [_eager_twin(model)(x) for x in inputs]
    torch.save((inputs, expected), tmp_path / "io.pt")


_CHECK_OUTPUTS = f"""
        inputs, expected = torch.load("io.pt")
        for x, want in zip(inputs, expected):
            with torch.no_grad():
                got = run(x)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < {TOL[torch.float32]}, (tuple(x.shape), err)
        print("ok")
"""


def test_torch_export_dynamic_spatial_dims():
    m = _reference()
    dims, sizes = _dims(), SIZES
    if POOL_GUARD:
        with pytest.raises(Exception, match="Constraints violated"):
            torch.export.export(m, (torch.randn(2, 16, 14, 21),), dynamic_shapes={"x": dims})
        dims = {2: 7 * Dim("_h", min=2, max=146), 3: 7 * Dim("_w", min=2, max=146)}
        sizes = [(h, w) for h, w in SIZES if h % 7 == 0 and w % 7 == 0]
    ep = torch.export.export(m, (torch.randn(2, 16, 14, 21),), dynamic_shapes={"x": dims})
    for h, w in sizes:
        x = torch.randn(2, 16, h, w)
        assert rel_err(ep.module()(x), m(x)) < TOL["fp32_pass"]
    with pytest.raises(Exception, match="size|shape"):
        ep.module()(torch.randn(2, 16, 7, 28))  # outside the declared range: refused, not wrong


@needs_cpp
@pytest.mark.parametrize("window_size", [7, -1])
def test_torchscript_trace_save_and_load_in_a_fresh_process(window_size, tmp_path):
    model = _fused_model(window_size)
    traced = torch.jit.trace(model, torch.randn(2, 3, 21, 28))
    assert "scsa_cpp::forward" in str(traced.inlined_graph)
    traced.save(str(tmp_path / "model.pt"))
    _sizes_and_expected(model, tmp_path)
    out = _in_fresh_process("""
        import torch
        import scsa_ops  # registers the scsa_cpp ops the saved graph calls
        module = torch.jit.load("model.pt")
        run = module
    """ + _CHECK_OUTPUTS, tmp_path)
    assert out.strip() == "ok"


def test_torchscript_script_says_to_trace():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), SCSA(16, head_num=2))
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.script(model)


@needs_cpp
@pytest.mark.parametrize("window_size", [7, -1])
def test_export_keeps_the_fused_op_with_dynamic_sizes(window_size):
    model = _fused_model(window_size)
    ep = torch.export.export(model, (torch.randn(2, 3, 21, 28),), dynamic_shapes=(_dims(),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.scsa_cpp.forward.default in targets
    twin = _eager_twin(model)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert rel_err(ep.module()(x), twin(x)) < TOL[torch.float32]


@needs_triton
def test_triton_path_traces_and_exports():
    """In the interpreter (the kernels' own GPU deployment needs a GPU): both graphs record the
    scsa_triton forward op; the trace follows the input's size. The export is static: the Triton
    launcher picks block sizes from the shape, so a dynamic export would hold within one bucket."""
    model = _fused_model(-1, backend="triton")
    example = torch.randn(2, 3, 14, 21)
    traced = torch.jit.trace(model, example)
    ep = torch.export.export(model, (example,))
    assert "scsa_triton::forward" in str(traced.inlined_graph)
    assert torch.ops.scsa_triton.forward.default in [n.target for n in ep.graph.nodes]
    twin = _eager_twin(model)
    with torch.no_grad():
        assert rel_err(ep.module()(example), twin(example)) < TOL[torch.float32]
        x = torch.randn(2, 3, 21, 28)
        assert rel_err(traced(x), twin(x)) < TOL[torch.float32]


@needs_cpp
def test_aoti_package_runs_the_fused_op_in_a_fresh_process(tmp_path):
    model = _fused_model(-1)
    ep = torch.export.export(model, (torch.randn(2, 3, 21, 28),), dynamic_shapes=(_dims(),))
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    _sizes_and_expected(model, tmp_path)
    out = _in_fresh_process("""
        import torch
        x = torch.randn(2, 3, 21, 28)
        try:  # without scsa_ops the package cannot run: it calls the fused op, not a decomposition
            torch._inductor.aoti_load_package("model.pt2")(x)
            print("ran without scsa_ops")
        except Exception:
            pass
        import scsa_ops
        run = torch._inductor.aoti_load_package("model.pt2")
    """ + _CHECK_OUTPUTS, tmp_path)
    assert out.strip() == "ok"


def _onnx_run(model, example, dynamic_shapes, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (pyproject [test])")
    onnx = pytest.importorskip("onnx", reason="onnx is a test dependency (pyproject [test])")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes).save(str(path))
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def test_onnx_export_runs_in_onnxruntime_at_three_sizes(tmp_path):
    m = _reference()
    run = _onnx_run(m, torch.randn(2, 16, 14, 21), (_dims(),), tmp_path)
    for h, w in SIZES:
        x = torch.randn(2, 16, h, w)
        assert rel_err(run(x), m(x)) < TOL[torch.float32]


@needs_cpp
@pytest.mark.skipif(TORCH_2_6, reason="torch 2.6's ONNX exporter does not mark the export, so the fused op "
                    "cannot decompose there: scsa_ops.revert(model) first (README 'Install')")
def test_onnx_export_of_a_fused_model_without_convert(tmp_path):
    model = _fused_model()
    run = _onnx_run(model, torch.randn(2, 3, 14, 21), (_dims(),), tmp_path)
    assert isinstance(model[1], SCSA) and model[1].backend == "cpp"  # nothing was converted
    for h, w in SIZES[:2]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert rel_err(run(x), model(x)) < TOL[torch.float32]


# The newest opset the TorchScript-based (legacy, dynamo=False) exporter writes.
LEGACY_MAX_OPSET = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                           getattr(torch.onnx._constants, "ONNX_MAX_OPSET", 17))


@needs_cpp
@pytest.mark.parametrize("opset,dynamic,window_size", [(17, False, 7), (17, True, 7), (LEGACY_MAX_OPSET, True, -1)],
                         ids=["opset17-static", "opset17-dynamic-hw", f"opset{LEGACY_MAX_OPSET}-dynamic-hw-global"])
def test_legacy_onnx_export_of_a_fused_model(opset, dynamic, window_size, tmp_path):
    """torch.onnx.export(dynamo=False), what ultralytics' export and most TensorRT pipelines call, on a
    fused model with no convert first: the reference math in standard operators, pooling with static
    kernels (AveragePool, ReduceMean; no adaptive pooling), onnxruntime equal to the eager module
    at two sizes with dynamic H and W, and the model unchanged by the export."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (pyproject [test])")
    onnx = pytest.importorskip("onnx", reason="onnx is a test dependency (pyproject [test])")
    model = _fused_model(window_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 28, 35)
    with torch.no_grad():
        before = model(x)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                      dynamic_axes={"x": {2: "h", 3: "w"}} if dynamic else None)
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    assert not [n.op_type for n in graph.node if "Adaptive" in n.op_type or n.op_type.startswith("Global")]
    session = ort.InferenceSession(str(path))
    twin = _eager_twin(model)
    for h, w in [(28, 35), (14, 49)] if dynamic else [(28, 35)]:
        xi = torch.randn(1, 3, h, w)
        with torch.no_grad():
            want = twin(xi)
        got = torch.from_numpy(session.run(None, {"x": xi.numpy()})[0])
        assert (got - want).abs().max() <= TOL[torch.float32] * want.abs().max().clamp_min(1)
    assert isinstance(model[1], SCSA) and model[1].backend == "cpp"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
