"""scsa_ops.convert / revert on models holding the official class (a look-alike written in
tests/official.py), our reference module, and our fused module."""
import pytest
import torch
import torch.nn as nn

from helpers import TOL, randomize_, rel_err
from official import OfficialSCSA
from scsa_ops import SCSA, convert, revert
from scsa_ops.reference import SCSA as Reference


class Block(nn.Module):
    def __init__(self, dim, attention):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.attn = attention

    def forward(self, x):
        return x + self.attn(self.conv(x))


def _model(seed=0):
    """Three SCSA modules of different classes and configurations, two levels deep, fp64."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        OfficialSCSA(16, head_num=2, qkv_bias=True, gate_layer="softmax", attn_drop_ratio=0.1),
        Block(16, OfficialSCSA(16, head_num=4, window_size=-1, group_kernel_sizes=[3, 3, 5, 7])),
        Block(16, Reference(16, head_num=1, window_size=3)),
    ).double()
    for m in model.modules():
        if isinstance(m, (OfficialSCSA, Reference)):
            randomize_(m, g)
    return model.eval()


def _x():
    return torch.randn(2, 3, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_convert_keeps_outputs_parameters_and_state(backend):
    model = _model()
    model[2].attn.train()  # mode is per module: kept as it was
    params = dict(model.named_parameters())
    before = model(_x())
    assert convert(model, backend=backend) == 3
    assert [type(m) for m in (model[1], model[2].attn, model[3].attn)] == [SCSA] * 3
    assert {m.backend for m in model.modules() if isinstance(m, SCSA)} == {backend}
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert model[2].attn.training and not model[1].training
    assert (model[1].head_num, model[1].qkv_bias, model[1].gate_layer, model[1].attn_drop_ratio) == \
        (2, True, "softmax", pytest.approx(0.1))
    assert (model[2].attn.window_size, model[2].attn.group_kernel_sizes) == (-1, (3, 3, 5, 7))
    assert rel_err(model(_x()), before) < TOL[torch.float64]
    assert convert(model, backend=backend) == 0  # idempotent


def test_convert_switches_backend_and_reverts():
    model = _model()
    before = model(_x())
    assert convert(model, backend="cpp") == 3
    assert convert(model, backend="eager") == 3
    assert [type(m) for m in (model[1], model[2].attn, model[3].attn)] == [Reference] * 3
    assert rel_err(model(_x()), before) < TOL[torch.float64]
    assert revert(model) == 0
    assert convert(model) == 3 and convert(model, backend="cpp") == 3  # auto -> cpp: a new backend
    assert revert(model) == 3


def test_optimizer_built_before_convert_still_trains_the_model():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    convert(model, backend="cpp")
    w = model[1].q.weight.detach().clone()
    model(_x()).square().mean().backward()
    opt.step()
    assert not torch.equal(model[1].q.weight, w)


def test_look_alike_that_cannot_be_mapped_is_left_with_a_warning():
    odd = OfficialSCSA(16, head_num=2)
    odd.sa_gate = odd.ca_gate = nn.SiLU()
    model = nn.Sequential(odd, OfficialSCSA(16, head_num=2))
    with pytest.warns(RuntimeWarning, match=r"0 \(OfficialSCSA\) looks like an SCSA but was left unchanged: gates"):
        assert convert(model) == 1
    assert type(model[0]) is OfficialSCSA and type(model[1]) is SCSA
    extra = OfficialSCSA(16, head_num=2)
    extra.conv_d = nn.Conv2d(16, 16, 1)  # e.g. 'recombination' pooling: a parameter we have no place for
    with pytest.warns(RuntimeWarning, match="are not the official SCSA's"):
        assert convert(nn.Sequential(extra)) == 0


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend 'fast'"):
        convert(_model(), backend="fast")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        convert(lambda x: x)
    with pytest.raises(ValueError, match="is itself an SCSA"):
        convert(OfficialSCSA(16, head_num=2))


def test_models_without_scsa_are_untouched():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert(model) == 0 and revert(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_attributes_a_framework_set_travel_with_the_module(backend):
    """ultralytics routes its layers by attributes it sets on each (`i`, `f`, `type`, `np`)."""
    model = _model()
    model[1].i, model[1].f, model[1].type = 1, -1, "OfficialSCSA"
    assert convert(model, backend=backend) == (2 if backend == "eager" else 3)  # model[3] is a Reference
    assert (model[1].i, model[1].f, model[1].type) == (1, -1, "OfficialSCSA")
    assert model[1].dim == 16 and isinstance(model[1], Reference)
