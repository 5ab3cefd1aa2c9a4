"""Dispatch: which implementation runs, fallbacks with one warning, the environment switch, and
configurations without a fused path running the eager math with the same parameters."""
import warnings

import pytest
import torch

from helpers import DEVICE, HAS_CUDA, TOL, needs_triton, pair, rel_err
from scsa_ops import SCSA, backends

requires_cpu = pytest.mark.skipif(HAS_CUDA, reason="CPU-only dispatch rules")


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """The tests here change what a provider's loading finds: dispatch decides anew for each."""
    monkeypatch.setattr(backends, "_resolved", {})


def _spy(monkeypatch):
    """Counts SCSAFunction calls, i.e. fused launches of the whole op."""
    calls = []
    from scsa_ops import functional

    real = functional.fused_scsa
    monkeypatch.setattr(functional, "fused_scsa", lambda *a: calls.append(a[3]) or real(*a))
    return calls


def test_triton_backend_runs_fused(monkeypatch):
    calls = _spy(monkeypatch)
    SCSA(16, backend="triton").to(DEVICE)(torch.randn(1, 16, 14, 14, device=DEVICE))
    assert len(calls) == 1 and calls[0] is backends.triton_provider()[0]


@pytest.mark.parametrize("cfg,train", [
    (dict(dim=16, down_sample_mode="max_pool"), False),
    (dict(dim=16, attn_drop_ratio=0.2), True),
])
def test_unfused_configs_run_eager_with_same_params(monkeypatch, cfg, train):
    calls = _spy(monkeypatch)
    ref, fused = pair(cfg)
    ref.train(train), fused.train(train)
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(3)
    out_r = ref(x)
    torch.manual_seed(3)
    out_f = fused(x)
    assert calls == [] and rel_err(out_f, out_r) == 0.0


def test_env_switch_turns_fused_off(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setenv("SCSA_OPS_BACKEND", "eager")
    SCSA(16, backend="triton").to(DEVICE)(torch.randn(1, 16, 14, 14, device=DEVICE))
    assert calls == []
    monkeypatch.setenv("SCSA_OPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend 'fastest'"):
        SCSA(16)(torch.randn(1, 16, 14, 14, device=DEVICE))


@requires_cpu
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from scsa_ops.ops.triton import utils

    monkeypatch.setattr(utils, "INTERPRET", False)  # as if TRITON_INTERPRET had not been set at import
    with pytest.raises(RuntimeError, match="needs a CUDA tensor, or TRITON_INTERPRET=1"):
        SCSA(16, backend="triton")(torch.randn(1, 16, 14, 14))


def test_cpp_unavailable_is_a_clear_error(monkeypatch):
    from scsa_ops.ops import cpp

    monkeypatch.setattr(cpp, "_state", (None, "scsa_ops._C_avx2 does not import (test)"))
    with pytest.raises(RuntimeError, match=r"backend='cpp' is unavailable: scsa_ops._C_avx2 does not import \(test\)"):
        SCSA(16, backend="cpp")(torch.randn(1, 16, 14, 14))


def test_cpp_needs_a_cpu_tensor():
    provider, why = backends._cpp_for(torch.device("meta"))
    assert provider is None and "needs a CPU tensor" in why


def test_auto_falls_back_with_one_warning(monkeypatch):
    """Triton missing (or a GPU too old) on CUDA, no C++ extension on CPU: eager, warned once."""
    from scsa_ops.ops import cpp

    monkeypatch.setattr(backends, "_triton", (None, "Triton is not importable (test)"))
    monkeypatch.setattr(cpp, "_state", (None, "scsa_ops._C_avx2 does not import (test)"))
    monkeypatch.setattr(backends, "_warned", set())
    calls = _spy(monkeypatch)
    m = SCSA(16).to(DEVICE)
    x = torch.randn(1, 16, 14, 14, device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(x), m(x)
    msgs = [str(w.message) for w in caught if "falls back to the eager module" in str(w.message)]
    assert len(msgs) == 1 and calls == []


def test_old_gpu_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    provider, why = backends._triton_for(torch.device("cuda"))
    assert provider is None and "compute capability" in why and "(7, 0)" in why


def test_too_wide_rows_run_eager(monkeypatch):
    calls = _spy(monkeypatch)
    m = SCSA(4, window_size=-1, backend="triton").to(DEVICE)
    m(torch.randn(1, 4, 2, 2100, device=DEVICE))
    assert calls == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_inputs_device():
    ref, fused = pair(dict(dim=16), device="cuda:1")
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64, device="cuda:1")
    with torch.cuda.device(0):
        assert rel_err(fused(x), ref(x)) < TOL[torch.float64]


def test_a_triton_older_than_any_tested_turns_the_triton_path_off(monkeypatch):
    """Read from the metadata, named with both versions: one warning at import, then the Triton path
    says why it is off, and the C++ path is untouched."""
    real = backends.importlib.metadata.version
    monkeypatch.setattr(backends.importlib.metadata, "version",
                        lambda name: "3.2.0" if name == "triton" else real(name))
    monkeypatch.setattr(backends, "TRITON_TOO_OLD", backends._triton_too_old())
    monkeypatch.setattr(backends, "_triton", None)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning) as caught:
        backends.warn_if_triton_too_old()
        backends.warn_if_triton_too_old()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "triton 3.2.0 is older than triton 3.3" in message and f"torch {torch.__version__}" in message
    provider, why = backends.triton_provider()
    assert provider is None and "triton 3.2.0" in why
    with pytest.raises(RuntimeError, match="triton 3.2.0 is older"):
        SCSA(16, backend="triton").to(DEVICE)(torch.randn(1, 16, 14, 14, device=DEVICE))
    if not HAS_CUDA:
        SCSA(16, backend="cpp")(torch.randn(1, 16, 14, 14))


@needs_triton
def test_a_triton_that_cannot_compile_the_kernels_turns_the_triton_path_off(monkeypatch):
    """The first use on a device compiles and runs one small forward and backward: a failure there
    (here a kernel that raises, as a compiler of an untested release would) is the reason the Triton
    path is off, with both versions named, instead of an error in the user's step."""
    from scsa_ops.ops.triton import apply_gates

    provider = backends.triton_provider()[0]
    monkeypatch.setattr(backends, "_compiled", {})
    device = torch.device(DEVICE)

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(apply_gates._apply_gates_kernel, "run", broken)
    why = backends.first_compile(provider, device)
    assert why.startswith("triton ") and f"torch {torch.__version__}" in why and "PassManager::run failed" in why
    assert backends.first_compile(provider, device) is why  # once a device
    monkeypatch.setattr(backends, "_compiled", {})
    monkeypatch.undo()
    assert backends.first_compile(provider, device) is None


@requires_cpu
@needs_triton
def test_the_cuda_path_is_off_where_the_first_compile_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(backends, "first_compile", lambda provider, device: "triton X failed to compile (test)")
    assert backends._triton_for(torch.device("cuda")) == (None, "triton X failed to compile (test)")
    monkeypatch.setattr(backends, "first_compile", lambda provider, device: None)
    assert backends._triton_for(torch.device("cuda"))[0] is backends.triton_provider()[0]
