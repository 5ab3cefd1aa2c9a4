"""`SCSA` as a layer of ultralytics YOLO model yamls: `import scsa_ops.integrations.ultralytics`,
then `[-1, 1, SCSA, [head_num, ...]]` in a yaml builds `scsa_ops.SCSA(channels, head_num, ...)`.

ultralytics' `parse_model` gives input channels only to the layers it knows by name, and finds a
yaml name among `ultralytics.nn.tasks`' globals. So `register()` puts a channel-preserving
placeholder there under the name SCSA and wraps `parse_model`: after the original has built the
network (channels and width scaling flow through the placeholder unchanged), one no-grad forward
in eval mode at the size ultralytics itself probes strides with records each placeholder's input
channels, and each is replaced by the fused module with the yaml's arguments. Checkpoints then
pickle `scsa_ops.SCSA` itself: loading one needs scsa_ops, not this hook. ultralytics' own files
are not touched; the hook lives in this process (ultralytics' multi-GPU DDP launcher starts fresh
processes from a generated script, so there train single-process or import this in that script).
"""
import functools

import torch
import torch.nn as nn
from ultralytics.nn import tasks

from ..module import SCSA as FusedSCSA

PROBE_SIZE = 256  # ultralytics' stride probe: every map of a stride-32 network is >= 8 x 8


class SCSA(nn.Module):
    """Placeholder for a yaml row `[from, n, SCSA, args]`: identity that records its input
    channels during the probe; `args` are `scsa_ops.SCSA`'s after `dim`."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs, self.channels = args, kwargs, None

    def forward(self, x):
        self.channels = x.shape[1]
        return x


def _placeholders(layer):
    return [m for m in layer.modules() if isinstance(m, SCSA)]


def _probe_channels(model, ch, last):
    """Run `model` (ultralytics' routing of outputs between layers) on zeros up to layer `last`, the
    last placeholder's, in eval mode so no BatchNorm statistic moves."""
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE,
                    device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    outputs = []
    model.eval()
    try:
        with torch.no_grad():
            for i, layer in enumerate(model.children()):
                if layer.f != -1:
                    x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j]
                                                                            for j in layer.f]
                x = layer(x)
                outputs.append(x)
                if i == last:
                    break
    finally:
        model.train(was_training)


def _fuse_placeholders(layer):
    """Replace every placeholder inside `layer` (itself, or the members of an n > 1 Sequential)."""
    if isinstance(layer, SCSA):
        return FusedSCSA(layer.channels, *layer.args, **layer.kwargs)
    for name, child in layer.named_children():
        if isinstance(child, SCSA):
            layer._modules[name] = FusedSCSA(child.channels, *child.args, **child.kwargs)
    return layer


def _parse_model(original, d, ch, verbose=True):
    model, save = original(d, ch, verbose)
    holding = [i for i, layer in enumerate(model) if _placeholders(layer)]
    if not holding:
        return model, save
    _probe_channels(model, ch, holding[-1])
    for i in holding:
        layer = model[i]
        fused = _fuse_placeholders(layer)
        fused.i, fused.f, fused.type = layer.i, layer.f, "scsa_ops.SCSA"
        fused.np = sum(p.numel() for p in fused.parameters())
        model[i] = fused
    return model, save


def register():
    """Make `SCSA` a yaml layer name for ultralytics in this process (idempotent; the import of this
    module calls it)."""
    if getattr(tasks.parse_model, "scsa_ops_original", None) is None:
        original = tasks.parse_model
        wrapped = functools.wraps(original)(functools.partial(_parse_model, original))
        wrapped.scsa_ops_original = original
        tasks.parse_model = wrapped
    existing = tasks.__dict__.get("SCSA")
    if existing is not None and existing is not SCSA:
        raise RuntimeError(f"ultralytics.nn.tasks already defines SCSA ({existing!r}); scsa_ops would shadow it")
    tasks.SCSA = SCSA


register()
