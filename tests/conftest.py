"""Test set-up: with no CUDA device, Triton kernels run in its interpreter on CPU tensors, which
must be switched on before triton is first imported; every kernel output starts as NaN."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (scsa_ops does)
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["SCSA_OPS_POISON"] = "1"
os.environ.pop("SCSA_OPS_BACKEND", None)

import pytest  # noqa: E402

from helpers import FUSED  # noqa: E402


def _patch_language_once_a_launch():
    """Triton's interpreter re-patches triton.language on every device-function call
    (inspect.getmembers of the language modules: ~0.4 ms a call, tl.sum and tl.zeros included).
    The patches of a launch and of its calls hold until the launch ends (a call's are never
    undone at all), so within a launch each set of language modules (triton.language, .core) a
    function's module holds is patched once."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, launched = interpreter._patch_lang, []

    def langs(fn):
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    class LaunchScope:
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            launched.clear()
            self.scope.restore()

    def once_a_launch(fn):
        if not launched:  # a kernel launch, which restores the patches when it ends
            launched.append(langs(fn))
            return LaunchScope(patch_lang(fn))
        seen = langs(fn)
        if seen <= launched[0]:
            return None  # a device function's call (it discards the scope)
        launched[0] |= seen
        return patch_lang(fn)

    interpreter._patch_lang = once_a_launch


_patch_language_once_a_launch()


@pytest.fixture(autouse=True)
def _seed():
    """Each test draws the same numbers whatever ran before it (or whichever subset runs): a
    tolerance that held here holds in CI, and a failure reproduces alone."""
    torch.manual_seed(0)


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
