"""Every backend against float64 vectors produced by the official SCSA module itself."""
import pytest

from cases import GOLDEN, golden_id
from helpers import FUSED, check_matches_official
from scsa_ops import SCSA

BACKENDS = ["reference", "eager", *(backend for backend, _ in FUSED)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GOLDEN, ids=[golden_id(c) for c in GOLDEN])
def test_matches_official(case, backend):
    check_matches_official(case, backend)


def test_official_checkpoint_loads_strict():
    case = GOLDEN[3]  # qkv_bias=True: q/k/v carry biases
    m = SCSA(**case["config"])
    assert set(m.state_dict()) == set(case["state_dict"])
    m.load_state_dict(case["state_dict"], strict=True)
    for name, t in m.state_dict().items():
        assert t.shape == case["state_dict"][name].shape
