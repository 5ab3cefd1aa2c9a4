"""`SCSA` in OpenMMLab configs: `custom_imports=dict(imports=["scsa_ops.integrations.mmengine"])`
registers it in mmengine's root `MODELS` registry, which every OpenMMLab codebase's registry falls
back to, and in mmpretrain's and mmdet's own registries where those are installed (the official
SCSA ships inside an mmpretrain fork, whose registration this one replaces, with a warning).

mmcv's `build_plugin_layer(cfg, in_channels=...)`, what a ResNet's `plugins=[dict(cfg=dict(
type="SCSA", head_num=8), position="after_conv3")]` calls, passes the channels as `in_channels`.
"""
import importlib
import warnings

from mmengine.registry import MODELS

from ..module import SCSA as FusedSCSA

# Codebases whose registries get SCSA by name, besides mmengine's root.
CODEBASES = ("mmpretrain", "mmdet")


class SCSA(FusedSCSA):
    """`scsa_ops.SCSA` that also takes its channels as `in_channels`, mmcv's plugin keyword."""

    def __init__(self, dim=None, *args, in_channels=None, **kwargs):
        if (dim is None) == (in_channels is None):
            raise TypeError(f"SCSA: give the channels once, as dim or in_channels (got dim={dim!r}, "
                            f"in_channels={in_channels!r})")
        super().__init__(in_channels if dim is None else dim, *args, **kwargs)


def registries():
    """mmengine's MODELS, and the MODELS of each importable codebase of CODEBASES."""
    found = [MODELS]
    for codebase in CODEBASES:
        try:
            found.append(importlib.import_module(f"{codebase}.registry").MODELS)
        except ImportError:
            continue
    return found


def register():
    """Register SCSA in registries() (idempotent; importing this module calls it)."""
    for registry in registries():
        existing = registry.module_dict.get("SCSA")
        if existing is SCSA:
            continue
        if existing is not None:
            warnings.warn(f"scsa_ops: {registry.scope}'s registry had SCSA = {existing.__module__}."
                          f"{existing.__qualname__}; it now builds scsa_ops' fused SCSA (same parameters and "
                          "state dict)", RuntimeWarning, stacklevel=2)
        registry.register_module(name="SCSA", module=SCSA, force=True)


register()
