"""Bad input fails early with a ValueError / TypeError that names the problem."""
import pytest
import torch

from helpers import DEVICE
from scsa_ops import SCSA


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=10), "multiple of 4"),
    (dict(dim=16, head_num=3), "divisible by head_num=3"),
    (dict(dim=16, group_kernel_sizes=(3, 4, 7, 9)), "odd"),
    (dict(dim=16, group_kernel_sizes=(3, 5, 7)), "four odd"),
    (dict(dim=16, window_size=0), "window_size"),
    (dict(dim=16, gate_layer="relu"), "gate_layer 'relu'"),
    (dict(dim=16, down_sample_mode="bilinear"), "down_sample_mode 'bilinear'"),
    (dict(dim=16, down_sample_mode="recombination"), "recombination"),
    (dict(dim=16, backend="cuda"), "backend 'cuda'"),
    (dict(dim=16, attn_drop_ratio=1.5), "attn_drop_ratio"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SCSA(**kwargs)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("x,exc,match", [
    (torch.randn(16, 14, 14), ValueError, r"4-D input.*\(16, 14, 14\)"),
    (torch.randn(2, 8, 14, 14), ValueError, r"8 channels.*dim=16"),
    (torch.randn(2, 16, 6, 14), ValueError, r"6x14.*window_size=7"),
    (torch.randn(2, 16, 14, 5), ValueError, r"14x5.*window_size=7"),
    (torch.randint(0, 5, (2, 16, 14, 14)), TypeError, "floating-point.*torch.int64"),
    (torch.randn(2, 16, 14, 14, dtype=torch.complex64), TypeError, "floating-point.*complex64"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input(backend, x, exc, match):
    m = SCSA(16, backend=backend)
    if isinstance(x, torch.Tensor):
        x = x.to(DEVICE)
        m = m.to(DEVICE)
    with pytest.raises(exc, match=match):
        m(x)


def test_parameters_on_another_device():
    m = SCSA(16, backend="triton")  # parameters stay on the CPU
    x = torch.randn(1, 16, 14, 14, device="meta")
    with pytest.raises(ValueError, match="parameters are on cpu but the input is on meta"):
        m(x)


def test_global_window_accepts_tiny_maps():
    out = SCSA(16, window_size=-1, backend="eager")(torch.randn(1, 16, 1, 2))
    assert out.shape == (1, 16, 1, 2)
