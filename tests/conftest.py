"""Test set-up: with no CUDA device, Triton kernels run in its interpreter on CPU tensors, which
must be switched on before triton is first imported; every kernel output starts as NaN."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["SCSA_OPS_POISON"] = "1"
os.environ.pop("SCSA_OPS_BACKEND", None)

import pytest  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
