"""Networks that host SCSA, built from plain torch.nn (no torchvision), for the model benchmark
and for tests: ResNet-50/101 with SCSA after the 3x3 conv of every bottleneck, MobileNetV2 with
SCSA on the hidden width of every inverted residual, and the same networks without it.

    model = resnet50(backend="auto")     # SCSA-ResNet-50, fused SCSA where available
    plain = resnet50(scsa=False)         # the plain network
    shapes = scsa_input_shapes(model, (8, 3, 224, 224))   # what SCSA is fed, without running it
"""
from collections import Counter

import torch

from .mobilenetv2 import mobilenet_v2
from .resnet import resnet50, resnet101

BUILDERS = {"resnet50": resnet50, "resnet101": resnet101, "mobilenetv2": mobilenet_v2}


def scsa_modules(model):
    from ..reference import SCSA as Reference

    return [m for m in model.modules() if isinstance(m, Reference)]


def scsa_input_shapes(model, input_shape):
    """Counter {(B, C, H, W): how many SCSA modules see that input} for one forward of a tensor of
    `input_shape`, traced on the meta device: no memory, no compute, any input size."""
    shapes = Counter()
    hooks = [m.register_forward_pre_hook(lambda _m, args: shapes.update([tuple(args[0].shape)]))
             for m in scsa_modules(model)]
    try:
        meta = _meta_copy(model)
        with torch.no_grad():
            meta(torch.empty(input_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _meta_copy(model):
    import copy

    from .. import SCSA

    twin = copy.deepcopy(model).to("meta")
    for m in twin.modules():
        if isinstance(m, SCSA):
            m.backend = "eager"  # fused kernels cannot run on meta tensors; the shapes are the same
    return twin


__all__ = ["BUILDERS", "mobilenet_v2", "resnet50", "resnet101", "scsa_input_shapes", "scsa_modules"]
