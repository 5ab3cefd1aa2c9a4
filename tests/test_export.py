"""Export with dynamic H and W: torch.export of the eager module, ONNX (dynamo exporter) run in
onnxruntime at three sizes, and a model holding the fused SCSA exported after convert(model,
backend='eager'). The range starts at two windows (H' W' >= 2): torch's shape reasoning guards a
pooled map of a single window (N = 1) out of the dynamic graph."""
import pytest
import torch
import torch.nn as nn
from torch.export import Dim

from helpers import randomize_, rel_err
from scsa_ops import SCSA, convert
from scsa_ops.reference import SCSA as Reference

SIZES = [(14, 21), (28, 28), (15, 50)]


def _dims(window=7):
    return {2: Dim("h", min=2 * window, max=1024), 3: Dim("w", min=2 * window, max=1024)}


def _reference():
    return randomize_(Reference(16, head_num=2, qkv_bias=True, gate_layer="softmax")).eval()


def test_torch_export_dynamic_spatial_dims():
    m = _reference()
    ep = torch.export.export(m, (torch.randn(2, 16, 14, 21),), dynamic_shapes={"x": _dims()})
    for h, w in SIZES:
        x = torch.randn(2, 16, h, w)
        assert rel_err(ep.module()(x), m(x)) < 1e-6
    with pytest.raises(Exception, match="size"):
        ep.module()(torch.randn(2, 16, 7, 28))  # outside the declared range: refused, not wrong


def _onnx_run(model, example, dynamic_shapes, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (pyproject [test])")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes).save(str(path))
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def test_onnx_export_runs_in_onnxruntime_at_three_sizes(tmp_path):
    m = _reference()
    run = _onnx_run(m, torch.randn(2, 16, 14, 21), (_dims(),), tmp_path)
    for h, w in SIZES:
        x = torch.randn(2, 16, h, w)
        assert rel_err(run(x), m(x)) < 1e-5


def test_model_with_fused_scsa_exports_after_convert_to_eager(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SCSA(16, head_num=2, backend="cpp"), nn.ReLU()).eval()
    randomize_(model[1])
    x = torch.randn(2, 3, 28, 35)
    fused_out = model(x)
    assert convert(model, backend="eager") == 1
    run = _onnx_run(model, torch.randn(2, 3, 14, 21), (_dims(),), tmp_path)
    assert rel_err(run(x), fused_out) < 1e-5
