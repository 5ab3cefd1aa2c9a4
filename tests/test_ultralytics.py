"""scsa_ops.integrations.ultralytics with the real ultralytics package: a YOLO yaml with SCSA rows
builds at every width scale, trains on a dataset written here, validates, predicts and exports to
ONNX; a checkpoint holding the official SCSA class converts to the fused one unchanged.

ultralytics needs torchvision, whose PyPI wheels are built for PyPI's (CUDA) torch: CI runs this
file in the torch 2.11.0 matrix environment (`make test-frameworks`)."""
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="ultralytics needs torchvision (CI: make test-frameworks)")
pytest.importorskip("ultralytics", reason="ultralytics is not installed (CI: make test-frameworks)")
# No pip installs and no downloads (ultralytics fetches fonts only to draw plots, which are off).
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ["YOLO_AUTOINSTALL"] = "false"

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import scsa_ops  # noqa: E402
import scsa_ops.integrations.ultralytics  # noqa: E402, F401
from helpers import TOL, randomize_  # noqa: E402
from official import OfficialSCSA  # noqa: E402

YAML = Path(__file__).parent / "data" / "yolo11-scsa.yaml"
IMGSZ = 128  # the P4 map (stride 16) is 8 x 8, over SCSA's 7 x 7 window


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("yolo")
    for scale in "nsmlx":
        shutil.copy(YAML, d / f"yolo11{scale}-scsa.yaml")
    return d


def _yolo(workdir, scale="n"):
    from ultralytics import YOLO

    return YOLO(str(workdir / f"yolo11{scale}-scsa.yaml"))


def _dataset(root):
    """A detection dataset in YOLO format: noise images with red (class 0) and green (class 1)
    boxes, 8 to train on and 4 to validate."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            img = (rng.random((IMGSZ, IMGSZ, 3)) * 60).astype(np.uint8)
            rows = []
            for cls, colour in enumerate(((220, 40, 40), (40, 220, 40))):
                w, h = rng.integers(24, 56, 2)
                x0, y0 = rng.integers(0, IMGSZ - w), rng.integers(0, IMGSZ - h)
                img[y0:y0 + h, x0:x0 + w] = colour
                box = ((x0 + w / 2) / IMGSZ, (y0 + h / 2) / IMGSZ, w / IMGSZ, h / IMGSZ)
                rows.append(f"{cls} " + " ".join(f"{v:.6f}" for v in box))
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(rows) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n")
    return data


def _scsa_layers(model):
    return {i: layer for i, layer in enumerate(model.model) if isinstance(layer, scsa_ops.SCSA)}


@pytest.mark.parametrize("scale", "nsmlx")
def test_yaml_builds_fused_scsa_with_the_scaled_channels(workdir, scale):
    model = _yolo(workdir, scale).model
    layers = _scsa_layers(model)
    assert sorted(layers) == [5, 8, 12]
    for i, layer in layers.items():
        feeding = model.model[i - 1]  # C3k2 or SPPF: their last conv gives the channels
        assert layer.dim == feeding.cv2.conv.out_channels, (scale, i)
        assert (layer.head_num, layer.window_size) == ((8, 7) if i != 12 else (8, -1))
        assert layer.i == i and layer.f == -1 and layer.np == sum(p.numel() for p in layer.parameters())
    assert model.stride.tolist() == [8.0, 16.0, 32.0]  # ultralytics' own probe ran through them


def test_train_validate_predict_export(workdir):
    import onnx
    import onnxruntime as ort

    data = _dataset(workdir / "data")
    yolo = _yolo(workdir)
    args = dict(imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, project=str(workdir / "runs"))
    yolo.train(data=str(data), epochs=2, amp=False, name="train", val=True, **args)
    trained = yolo.model  # reloaded from best.pt by the trainer
    assert len(_scsa_layers(trained)) == 3
    fresh = _yolo(workdir).model
    moved = [n for n, p in trained.named_parameters() if n.startswith("model.5.")
             and not torch.equal(p.float(), fresh.state_dict()[n].float())]
    assert moved, "training left SCSA's parameters at their initial values"

    metrics = yolo.val(data=str(data), **args)
    assert np.isfinite(metrics.box.map50)
    images = sorted((workdir / "data" / "images" / "val").glob("*.png"))
    results = yolo.predict([str(p) for p in images], imgsz=IMGSZ, conf=0.0, device="cpu", verbose=False,
                           project=str(workdir / "runs"))
    assert len(results) == len(images) and all(len(r.boxes) > 0 for r in results)

    onnx_file = yolo.export(format="onnx", imgsz=IMGSZ)
    graph = onnx.load(onnx_file).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    model = yolo.model.eval()
    with torch.no_grad():
        expected = model(x)[0]
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(None, {graph.input[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, **TOL["detection_close"])


def test_official_class_checkpoint_converts_unchanged(workdir, tmp_path):
    """A YOLO model holding the official SCSA class, saved whole as ultralytics does, loads; convert
    fuses it and the network's outputs and predictions stay the same."""
    from ultralytics import YOLO

    yolo = _yolo(workdir)
    g = torch.Generator().manual_seed(0)
    for i, layer in _scsa_layers(yolo.model).items():
        official = randomize_(OfficialSCSA(layer.dim, layer.head_num, window_size=layer.window_size), g)
        official.i, official.f, official.type, official.np = layer.i, layer.f, "OfficialSCSA", layer.np
        yolo.model.model[i] = official
    yolo.save(tmp_path / "official.pt")

    loaded = YOLO(str(tmp_path / "official.pt"))
    net = loaded.model.float().eval()
    assert sum(isinstance(m, OfficialSCSA) for m in net.modules()) == 3
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    image = (np.random.default_rng(1).random((IMGSZ, IMGSZ, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        before = net(x)[0]
    boxes_before = loaded.predict(image, imgsz=IMGSZ, conf=0.0, device="cpu", verbose=False)[0].boxes.data

    assert scsa_ops.convert(net) == 3
    assert len(_scsa_layers(net)) == 3 and not any(isinstance(m, OfficialSCSA) for m in net.modules())
    with torch.no_grad():
        after = net(x)[0]
    boxes_after = loaded.predict(image, imgsz=IMGSZ, conf=0.0, device="cpu", verbose=False)[0].boxes.data
    torch.testing.assert_close(after, before, **TOL["detection_close"])
    assert len(boxes_before) > 0
    torch.testing.assert_close(boxes_after, boxes_before, **TOL["detection_close"])
