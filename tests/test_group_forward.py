"""The Triton forward with F1-F3 in one launch (scsa_ops/ops/triton/group_forward.py) under the
checks the separate passes get: conftest.py keeps every other test on the separate passes, and
here every map takes the one launch (MAX_STEPS unbounded). The backward is the same either way;
it runs here on what the one launch saved."""
import pytest
import torch

from cases import CONFIGS as ALL_CONFIGS
from cases import GOLDEN as ALL_GOLDEN
from cases import LOW_PRECISION as ALL_LOW_PRECISION
from cases import NONFINITE_CASES, golden_id, ids, random_inputs
from helpers import (
    DEVICE,
    assert_matches_reference,
    check_gradcheck,
    check_low_precision,
    check_matches_official,
    eager_and_fused,
    forward_backward,
    nonfinite_mismatches,
)
from scsa_ops.ops.triton import group_forward
from scsa_ops.ops.triton.launches import LaunchRecorder

pytest.importorskip("triton")
TRITON = ("triton", DEVICE)
# Subsets of the shared cases (the interpreter's time): between them every option once
# (heads, q/k/v bias, global pooling and a window of 3 that drops columns, the softmax gate, other
# kernel sizes, maps of one to three bands), channels_last and 16-bit inputs.
GOLDEN = [ALL_GOLDEN[i] for i in (3, 5, 6)]
CONFIGS = [ALL_CONFIGS[i] for i in (4, 10)]
LOW_PRECISION = [ALL_LOW_PRECISION[2]]
NONFINITE = [(*NONFINITE_CASES[0], float("nan")), (*NONFINITE_CASES[0], float("inf")),
             (*NONFINITE_CASES[1], float("nan"))]


@pytest.fixture(autouse=True)
def _one_launch(monkeypatch):
    monkeypatch.setattr(group_forward, "MAX_STEPS", 1 << 30)


def test_forward_is_three_launches():
    _, fused = eager_and_fused(dict(dim=16, head_num=2), *TRITON, torch.float32)
    rec = LaunchRecorder()
    try:
        with torch.no_grad():
            fused(torch.randn(2, 16, 9, 16, device=DEVICE))
    finally:
        rec.restore()
    assert rec.names() == ["_group_fwd_kernel", "_channel_attention_fwd_kernel", "_poison_logits_kernel",
                           "_apply_gates_kernel"]


@pytest.mark.parametrize("shape,dtype,taken", [((32, 256, 14, 14), torch.float16, True),
                                               ((32, 512, 7, 7), torch.float32, True),
                                               ((32, 128, 28, 28), torch.float16, False),
                                               ((32, 64, 56, 56), torch.float16, False)])
def test_which_maps_take_it(shape, dtype, taken, monkeypatch):
    """ResNet-50 stages 3 and 4 (a group in one tile, at most two bands of rows), not 1 and 2."""
    monkeypatch.setattr(group_forward, "MAX_STEPS", 2)
    x = torch.empty(shape, dtype=dtype, device="meta")
    assert (group_forward.plan(x, (7, 7), torch.float32, (3, 5, 7, 9), False) is not None) == taken


@pytest.mark.parametrize("cfg,shape", CONFIGS, ids=ids(CONFIGS))
def test_fp64_matches_reference(cfg, shape):
    assert_matches_reference(cfg, shape, torch.float64, *TRITON)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg,shape", LOW_PRECISION, ids=ids(LOW_PRECISION))
def test_bf16(cfg, shape, channels_last):
    check_low_precision(cfg, shape, torch.bfloat16, channels_last, *TRITON)


def test_gradcheck_autograd_function():
    check_gradcheck(*TRITON)


@pytest.mark.parametrize("case", GOLDEN, ids=[golden_id(c) for c in GOLDEN])
def test_matches_official(case):
    check_matches_official(case, "triton")


@pytest.mark.parametrize("cfg,shape,value", NONFINITE, ids=["sigmoid-nan", "sigmoid-inf", "softmax-one-window-nan"])
def test_nonfinite_input(cfg, shape, value):
    eager, fused = eager_and_fused(cfg, *TRITON, torch.float32)
    x, go = random_inputs(shape, torch.float32, DEVICE)
    x[0, 3, 2, 5] = value
    assert not nonfinite_mismatches(forward_backward(fused, x, go), forward_backward(eager, x, go))
