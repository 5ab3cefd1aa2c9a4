"""Every backend against float64 vectors produced by the official SCSA module itself."""
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, FUSED, grad_err, rel_err, run
from scsa_ops import SCSA
from scsa_ops.reference import SCSA as Reference

CASES = torch.load(Path(__file__).parent / "data" / "official_scsa_fp64.pt", weights_only=True)
BACKENDS = ["reference", "eager", *(backend for backend, _ in FUSED)]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case["config"].items()).replace(" ", "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_official(case, backend):
    cls = Reference if backend == "reference" else SCSA
    kwargs = {} if backend == "reference" else {"backend": backend}
    dev = "cpu" if backend == "cpp" else DEVICE
    m = cls(**case["config"], **kwargs).double().to(dev)
    m.load_state_dict(case["state_dict"], strict=True)  # official names and shapes
    out, dx, dparams = run(m, case["x"].to(dev), case["grad_out"].to(dev))
    assert rel_err(out, case["out"]) < 1e-10
    assert rel_err(dx, case["grad_x"]) < 1e-10
    assert set(dparams) == set(case["grad_params"])
    errs = grad_err(dparams, {n: g.to(dev) for n, g in case["grad_params"].items()})
    assert max(errs.values()) < 1e-10, errs


def test_official_checkpoint_loads_strict():
    case = CASES[3]  # qkv_bias=True: q/k/v carry biases
    m = SCSA(**case["config"])
    assert set(m.state_dict()) == set(case["state_dict"])
    m.load_state_dict(case["state_dict"], strict=True)
    for name, t in m.state_dict().items():
        assert t.shape == case["state_dict"][name].shape
