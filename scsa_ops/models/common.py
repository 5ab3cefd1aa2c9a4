import torch.nn as nn


def attention(scsa, backend, scsa_kwargs):
    """width -> the attention module a block puts on that many channels."""
    if not scsa:
        if scsa_kwargs:
            raise ValueError(f"SCSA options {sorted(scsa_kwargs)} given for a network built with scsa=False")
        return lambda width: nn.Identity()
    from ..module import SCSA

    return lambda width: SCSA(width, backend=backend, **scsa_kwargs)


def init_convs(model):
    """Kaiming init of the network's own convs; SCSA's depthwise convs keep the module's init."""
    from ..reference import SCSA

    inside = {id(p) for m in model.modules() if isinstance(m, SCSA) for p in m.parameters()}
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m.weight) not in inside:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
