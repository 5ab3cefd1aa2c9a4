"""Test set-up: with no CUDA device, Triton kernels run in its interpreter on CPU tensors, which
must be switched on before triton is first imported; every kernel output starts as NaN."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (scsa_ops does)
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["SCSA_OPS_POISON"] = "1"
os.environ.pop("SCSA_OPS_BACKEND", None)

import pytest  # noqa: E402

from helpers import FUSED, HAS_CUDA  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Each test draws the same numbers whatever ran before it (or whichever subset runs): a
    tolerance that held here holds in CI, and a failure reproduces alone."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(params=FUSED, ids=[b for b, _ in FUSED])
def fused_on(request):
    """(backend, device) of each fused provider this machine runs."""
    return request.param


@pytest.fixture(autouse=True)
def _separate_passes(monkeypatch):
    """The Triton forward's five separate passes for every map: the small maps of these tests would
    otherwise take group_forward.py's one launch for F1-F3, which tests/test_group_forward.py runs
    under the same checks."""
    from scsa_ops.ops.triton import group_forward

    monkeypatch.setattr(group_forward, "MAX_STEPS", 0)
