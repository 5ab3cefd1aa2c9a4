"""Code written for the official class runs on ours: numpy integer arguments, the official
attributes sa_gate / ca_gate / attn_drop (attn_drop holds the dropout rate), window_size=-1 with
any down_sample_mode. Judged side by side with the official look-alike (tests/official.py)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import FUSED, TOL, randomize_, rel_err
from official import OfficialSCSA
from scsa_ops import SCSA
from scsa_ops.reference import SCSA as Reference


def _side_by_side(kwargs, backend="eager", mine_kwargs=None):
    official = randomize_(OfficialSCSA(16, **kwargs).double(), torch.Generator().manual_seed(0))
    mine = SCSA(**(mine_kwargs or dict(dim=16, **kwargs)), backend=backend).double()
    mine.load_state_dict(official.state_dict())
    return official, mine


def test_numpy_integer_arguments():
    args = dict(head_num=np.int64(2), window_size=np.int32(7), group_kernel_sizes=np.array([3, 5, 7, 9]))
    # The official forward splits by a numpy int, which torch.split refuses: it runs with Python ints.
    official, mine = _side_by_side(dict(head_num=2), "cpp", dict(dim=np.int64(16), **args))
    assert (mine.dim, mine.head_num, mine.window_size, mine.group_kernel_sizes) == (16, 2, 7, (3, 5, 7, 9))
    assert all(type(v) is int for v in (mine.dim, mine.head_num, mine.window_size, *mine.group_kernel_sizes))
    x = torch.randn(2, 16, 14, 21, dtype=torch.float64)
    assert rel_err(mine.eval()(x), official.eval()(x)) < TOL[torch.float64]


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=np.int64(16), head_num=np.int64(3)), r"dim=np.int64\(16\) must be divisible by head_num=np.int64\(3\)"),
    (dict(dim=np.int64(30), head_num=np.int64(2)), r"multiple of 4.*got np.int64\(30\)"),
    (dict(dim=16, head_num=2.0), r"head_num must be a positive int, got 2.0"),
    (dict(dim=16, window_size=np.int64(0)), r"window_size.*got np.int64\(0\)"),
])
def test_messages_print_the_value_as_given(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SCSA(**kwargs)


@pytest.mark.parametrize("gate_layer", ["sigmoid", "softmax"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_official_attributes_and_state_dict(gate_layer, qkv_bias):
    official, mine = _side_by_side(dict(head_num=2, gate_layer=gate_layer, qkv_bias=qkv_bias, attn_drop_ratio=0.1))
    for name in ("sa_gate", "ca_gate"):
        assert type(getattr(mine, name)) is type(getattr(official, name))
        if gate_layer == "softmax":
            assert getattr(mine, name).dim == getattr(official, name).dim
    assert isinstance(mine.attn_drop, nn.Dropout) and mine.attn_drop.p == official.attn_drop.p == 0.1
    assert list(mine.state_dict()) == list(official.state_dict())
    assert list(Reference(16, 2, qkv_bias=qkv_bias).state_dict()) == list(official.state_dict())


def test_attn_drop_holds_the_dropout_rate():
    official, mine = _side_by_side(dict(head_num=2))
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64)
    official.train(), mine.train()
    assert mine.fusable()
    for m in (official, mine):
        m.attn_drop.p = 0.5
    assert mine.attn_drop_ratio == 0.5 and not mine.fusable()  # dropout while training: the eager math
    torch.manual_seed(3)
    want = official(x)
    torch.manual_seed(3)
    got = mine(x)
    assert rel_err(got, want) < TOL[torch.float64]  # the same dropout mask, drawn in the same order
    assert rel_err(got, mine.eval()(x)) > 1e-3  # and it did drop
    mine.attn_drop_ratio = 0.0
    assert mine.attn_drop.p == 0.0


@pytest.mark.parametrize("backend", ["eager"] + [b for b, d in FUSED if d == "cpu"])
@pytest.mark.parametrize("mode", ["recombination", "max_pool", "avg_pool"])
def test_global_window_with_any_down_sample_mode(backend, mode):
    official, mine = _side_by_side(dict(head_num=4, window_size=-1, down_sample_mode=mode), backend)
    x = torch.randn(2, 16, 9, 13, dtype=torch.float64)
    assert mine.fusable()
    assert rel_err(mine.eval()(x), official.eval()(x)) < TOL[torch.float64]


@pytest.mark.parametrize("cls", [SCSA, Reference])
def test_factory_keywords_place_the_parameters(cls):
    """device= and dtype=, torch.nn's factory keywords (timm's attention factory passes them): every
    parameter is created there, and the module computes what the converted one does."""
    on_meta = cls(16, head_num=2, qkv_bias=True, device="meta")
    assert all(p.is_meta for p in on_meta.parameters())
    made = randomize_(cls(16, head_num=2, qkv_bias=True, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert all(p.dtype == torch.float64 for p in made.parameters())
    converted = cls(16, head_num=2, qkv_bias=True).double()
    converted.load_state_dict(made.state_dict())
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64)
    assert torch.equal(made.eval()(x), converted.eval()(x))
