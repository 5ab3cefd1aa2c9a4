"""A whole model holding the fused SCSA, handled as training frameworks handle it: deep copies
(ultralytics' and timm's EMA), pickles and torch.save of the module itself (ultralytics'
checkpoints), and a training step under torch.use_deterministic_algorithms(True) (ultralytics
sets it)."""
import copy
import pickle
import subprocess
import sys

import torch
import torch.nn as nn

from helpers import TOL, randomize_
from scsa_ops import SCSA


def _model(backend, device):
    torch.manual_seed(0)  # the convolutions' initialisation
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), randomize_(SCSA(16, head_num=2, backend=backend), g),
                          nn.Conv2d(16, 4, 1))
    return model.to(device)


def _x(device):
    return torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(1)).to(device)


def test_deepcopy_and_pickle_give_an_independent_equal_model(fused_on):
    backend, dev = fused_on
    model = _model(backend, dev)
    x = _x(dev)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone[1], SCSA) and clone[1].backend == backend
        assert torch.equal(clone(x), expected)
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.parameters(), model.parameters()))
        with torch.no_grad():
            clone[1].q.weight.add_(1.0)  # an EMA update of the copy leaves the model alone
        assert torch.equal(model(x), expected)


def test_torch_save_of_the_whole_model_loads_in_a_fresh_process(tmp_path):
    model = _model("cpp", "cpu").eval()
    x = _x("cpu")
    torch.save({"model": model, "x": x, "out": model(x).detach()}, tmp_path / "ckpt.pt")
    script = (f"import torch; ck = torch.load({str(tmp_path / 'ckpt.pt')!r}, weights_only=False); "
              "m = ck['model']; assert type(m[1]).__module__ == 'scsa_ops.module', type(m[1]); "
              "assert torch.equal(m(ck['x']), ck['out']); print('ok')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_training_step_under_deterministic_algorithms(fused_on):
    """Two identical SGD steps with deterministic algorithms on: they run, give bit-identical
    parameters, and match the eager module's step."""
    backend, dev = fused_on
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for b in (backend, backend, "eager"):
            model = _model(b, dev)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            for _ in range(2):
                opt.zero_grad()
                model(_x(dev)).square().mean().backward()
                opt.step()
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(False)
    first, second, eager = results
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, e in zip(first, eager):
        torch.testing.assert_close(a, e, **TOL["fp32_close"])
