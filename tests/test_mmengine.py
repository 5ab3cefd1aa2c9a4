"""scsa_ops.integrations.mmengine with mmengine, mmcv-lite and mmpretrain: a config's custom_imports
registers SCSA, mmcv's build_plugin_layer builds it from `in_channels` as OpenMMLab ResNets' plugins
do, and mmpretrain's registry builds it by name.

CI installs these in the torch 2.11.0 matrix environment (`make test-frameworks`)."""
import subprocess
import sys
import textwrap

import pytest
import torch

mmengine = pytest.importorskip("mmengine", reason="mmengine is not installed (CI: make test-frameworks)")

import scsa_ops  # noqa: E402
from helpers import TOL, randomize_  # noqa: E402


def test_custom_imports_register_scsa_in_a_fresh_process(tmp_path):
    config = tmp_path / "scsa_config.py"
    config.write_text(textwrap.dedent("""
        custom_imports = dict(imports=["scsa_ops.integrations.mmengine"], allow_failed_imports=False)
        model = dict(type="SCSA", dim=32, head_num=4, window_size=-1)
    """))
    script = textwrap.dedent(f"""
        from mmengine.config import Config
        from mmengine.registry import MODELS
        assert MODELS.get("SCSA") is None
        cfg = Config.fromfile({str(config)!r})
        m = MODELS.build(cfg.model)
        import scsa_ops
        assert isinstance(m, scsa_ops.SCSA) and (m.dim, m.head_num, m.window_size) == (32, 4, -1), m
        print("built", type(m).__module__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "built scsa_ops.integrations.mmengine" in run.stdout


def test_build_plugin_layer_passes_in_channels():
    pytest.importorskip("mmcv", reason="mmcv(-lite) is not installed (CI: make test-frameworks)")
    from mmcv.cnn import build_plugin_layer

    from scsa_ops.integrations.mmengine import SCSA

    # mmdet's ResNet Bottleneck: build_plugin_layer(plugin_cfg, in_channels=planes * 4, postfix=...)
    name, layer = build_plugin_layer(dict(type="SCSA", head_num=8), in_channels=64, postfix="_after_conv3")
    assert name == "scsa_after_conv3" and isinstance(layer, SCSA) and isinstance(layer, scsa_ops.SCSA)
    assert (layer.dim, layer.head_num, layer.backend) == (64, 8, "auto")
    with pytest.raises(TypeError, match="dim or in_channels"):
        SCSA(64, in_channels=64)
    with pytest.raises(TypeError, match="dim or in_channels"):
        SCSA(head_num=8)

    # The fused module behind the registry name computes what the eager one does, forward and backward.
    randomize_(layer.double(), torch.Generator().manual_seed(0))
    eager = scsa_ops.SCSA(64, head_num=8, backend="eager").double()
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64, 14, 14, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    x_e = x.detach().requires_grad_()
    out_e = eager(x_e)
    (dx_e,) = torch.autograd.grad(out_e.square().sum(), x_e)
    torch.testing.assert_close(out, out_e, **TOL["fp64_close"])
    torch.testing.assert_close(dx, dx_e, **TOL["fp64_close"])


def test_codebase_registries_build_scsa():
    mmpretrain = pytest.importorskip("mmpretrain.registry",
                                     reason="mmpretrain is not installed (CI: make test-frameworks)")
    from scsa_ops.integrations import mmengine as integration

    assert mmpretrain.MODELS in integration.registries()
    assert mmpretrain.MODELS.module_dict["SCSA"] is integration.SCSA
    m = mmpretrain.MODELS.build(dict(type="SCSA", in_channels=32, head_num=4))
    assert isinstance(m, scsa_ops.SCSA) and m.dim == 32


def test_a_foreign_registration_is_replaced_with_a_warning(monkeypatch):
    from mmengine.registry import Registry

    from scsa_ops.integrations import mmengine as integration

    child = Registry("model", parent=mmengine.registry.MODELS, scope="mmfake")
    child.register_module(name="SCSA", module=torch.nn.Identity)
    monkeypatch.setattr(integration, "registries", lambda: [child])
    with pytest.warns(RuntimeWarning, match="mmfake's registry had SCSA = torch.nn.modules.linear.Identity"):
        integration.register()
    assert child.module_dict["SCSA"] is integration.SCSA
