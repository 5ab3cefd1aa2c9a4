"""scsa_ops.models: the networks the model benchmark runs. Output shapes, where SCSA sits and
what it is fed, and the same outputs from every backend given the same weights."""
import pytest
import torch

from helpers import FUSED, TOL, randomize_, rel_err
from scsa_ops import SCSA
from scsa_ops.models import BUILDERS, mobilenet_v2, resnet50, scsa_input_shapes, scsa_modules

# SCSA inputs per 224x224 image (DESIGN.md section 1), with how many modules see each.
SHAPES_224 = {
    "resnet50": {(64, 56, 56): 3, (128, 28, 28): 4, (256, 14, 14): 6, (512, 7, 7): 3},
    "resnet101": {(64, 56, 56): 3, (128, 28, 28): 4, (256, 14, 14): 23, (512, 7, 7): 3},
    "mobilenetv2": {(32, 112, 112): 1, (96, 56, 56): 1, (144, 56, 56): 1, (144, 28, 28): 1, (192, 28, 28): 2,
                    (192, 14, 14): 1, (384, 14, 14): 4, (576, 14, 14): 2, (576, 7, 7): 1, (960, 7, 7): 3},
}
PARAMS_PLAIN = {"resnet50": 25_557_032, "resnet101": 44_549_160, "mobilenetv2": 3_504_872}  # torchvision's counts


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_scsa_sits_where_the_paper_puts_it(name):
    with torch.device("meta"):
        model, plain = BUILDERS[name](backend="eager"), BUILDERS[name](scsa=False)
    shapes = scsa_input_shapes(model, (3, 3, 224, 224))
    assert shapes == {(3, *s): n for s, n in SHAPES_224[name].items()}
    assert not scsa_modules(plain)
    assert sum(p.numel() for p in plain.parameters()) == PARAMS_PLAIN[name]
    assert scsa_input_shapes(model, (1, 3, 448, 448)).keys() == {(1, c, 2 * h, 2 * w) for c, h, w in SHAPES_224[name]}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_output_shape(name):
    model = BUILDERS[name](num_classes=10, backend="auto").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    assert all(isinstance(m, SCSA) and m.backend == "auto" for m in scsa_modules(model))


def test_options_reach_every_scsa_and_plain_rejects_them():
    model = resnet50(head_num=4, window_size=-1, gate_layer="softmax", backend="eager")
    assert {(m.head_num, m.window_size, m.gate_layer, m.backend) for m in scsa_modules(model)} == \
        {(4, -1, "softmax", "eager")}
    with pytest.raises(ValueError, match="head_num"):
        resnet50(scsa=False, head_num=4)


def _same_weights(builder, backends, **kw):
    """One fp64 eval-mode model per backend, all carrying the first one's (randomised) weights."""
    g = torch.Generator().manual_seed(0)
    first = builder(backend=backends[0], **kw).double()
    for m in scsa_modules(first):
        randomize_(m, g)
    models = [first] + [builder(backend=b, **kw).double() for b in backends[1:]]
    for m in models[1:]:
        m.load_state_dict(first.state_dict())
    return [m.eval() for m in models]


# ResNet-101 differs from ResNet-50 only in depth: the C++ path covers it. The Triton interpreter
# (seconds per network) runs ResNet-50 where CUDA is absent: MobileNetV2's SCSA shapes add no
# code path of its kernels (they are in the fused tests' configurations), only ~25 s of CI.
_NO_INTERPRETER = [(b, d) for b, d in FUSED if not (b == "triton" and d == "cpu")]


@pytest.mark.parametrize("name,providers", [("resnet50", FUSED), ("mobilenetv2", _NO_INTERPRETER),
                                            ("resnet101", [("cpp", "cpu")])],
                         ids=["resnet50", "mobilenetv2", "resnet101-cpp"])
def test_backends_agree_on_a_small_network(name, providers):
    """Narrow networks on a 64x64 input (2x2 windows, so the last stage still pools): small enough
    for the Triton interpreter, same code paths as the full-size ones."""
    kw = dict(width_mult=0.25) if name == "mobilenetv2" else dict(width=8)
    eager, *fused = _same_weights(BUILDERS[name], ["eager"] + [b for b, _ in providers], window_size=2,
                                  num_classes=10, **kw)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = eager(x)
        for model, (backend, device) in zip(fused, providers):
            assert rel_err(model.to(device)(x.to(device)), ref) < TOL["fp64_grad"], backend


@pytest.mark.parametrize("builder", [resnet50, mobilenet_v2])
def test_cpp_backend_on_the_full_network(builder):
    """The standard networks at 224x224 in fp32: the C++ path against the eager module, every
    SCSA shape of the benchmark presets."""
    eager, fused = _same_weights(builder, ["eager", "cpp"])
    eager, fused = eager.float(), fused.float()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(fused(x), eager(x)) < TOL[torch.float32]
