"""timm builds a fused SCSA-ResNet through its attention factory: `attn_layer=partial(SCSA,
head_num=8)` in a block's arguments, called as `attn_layer(channels, device=..., dtype=...)`.

timm imports torchvision, whose PyPI wheels are built for PyPI's (CUDA) torch: CI runs this file in
the torch 2.11.0 matrix environment (`make test-frameworks`)."""
from functools import partial

import pytest
import torch

pytest.importorskip("torchvision", reason="timm needs torchvision (CI: make test-frameworks)")
timm = pytest.importorskip("timm", reason="timm is not installed (CI: make test-frameworks)")

from helpers import TOL, DispatchedOps, randomize_  # noqa: E402
from scsa_ops import SCSA  # noqa: E402


def _resnet(backend):
    model = timm.create_model("resnet50", pretrained=False, num_classes=10,
                              block_args=dict(attn_layer=partial(SCSA, head_num=8, backend=backend)))
    return model.double()


def test_resnet50_with_fused_scsa_matches_the_eager_module():
    """Forward and every gradient of a training step (BatchNorm on batch statistics), fp64, against the
    same network whose SCSA modules run the eager math."""
    fused, eager = _resnet("auto"), _resnet("eager")
    scsa = [m for m in fused.modules() if isinstance(m, SCSA)]
    assert len(scsa) == 16 and {m.backend for m in scsa} == {"auto"}
    assert [m.dim for m in scsa[:3]] == [256] * 3 and scsa[-1].dim == 2048
    g = torch.Generator().manual_seed(0)
    for m in scsa:
        randomize_(m, g)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=g)  # stage 4 is 7 x 7, SCSA's window
    target = torch.randint(0, 10, (2,), generator=g)
    results = []
    for model in (fused, eager):
        with DispatchedOps() as dispatched:
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, dispatched.ops))
    (loss_f, grads_f, ops_f), (loss_e, grads_e, ops_e) = results
    assert ops_f.count("scsa_cpp.forward.default") == 16 and ops_f.count("scsa_cpp.backward.default") == 16
    assert not [op for op in ops_e if op.startswith("scsa_cpp.")]
    torch.testing.assert_close(loss_f, loss_e, **TOL["fp64_close"])
    assert grads_f.keys() == grads_e.keys()
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_e[n], **TOL["fp64_network_close"], msg=n)


def test_factory_keywords_place_the_parameters():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, device="meta", dtype=torch.float16,
                              block_args=dict(attn_layer=partial(SCSA, head_num=8)))
    scsa = [m for m in model.modules() if isinstance(m, SCSA)]
    assert len(scsa) == 8
    assert {(p.device.type, p.dtype) for m in scsa for p in m.parameters()} == {("meta", torch.float16)}
