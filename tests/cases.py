"""The cases several test modules share: SCSA configurations with input shapes, the official
module's golden vectors, and the non-finite-input cases."""
from pathlib import Path

import torch

# (constructor kwargs, input shape)
CONFIGS = [
    (dict(dim=8), (1, 8, 14, 14)),
    (dict(dim=16), (3, 16, 7, 7)),                                  # exactly one window
    (dict(dim=16, head_num=2), (2, 16, 17, 23)),                    # non-multiples of 7, non-square
    (dict(dim=32, head_num=4, qkv_bias=True), (2, 32, 15, 9)),
    (dict(dim=64, head_num=8), (1, 64, 14, 21)),
    (dict(dim=32, window_size=-1), (2, 32, 11, 6)),                 # global pooling
    (dict(dim=24, head_num=3, window_size=-1, qkv_bias=True), (3, 24, 5, 13)),
    (dict(dim=16, gate_layer="softmax"), (2, 16, 14, 20)),
    (dict(dim=32, gate_layer="softmax", head_num=2, window_size=5), (1, 32, 12, 18)),
    (dict(dim=16, group_kernel_sizes=(1, 3, 5, 7)), (2, 16, 21, 8)),
    (dict(dim=8, group_kernel_sizes=(9, 7, 11, 3), window_size=3), (3, 8, 10, 29)),
    (dict(dim=32, attn_drop_ratio=0.3), (2, 32, 9, 9)),             # eval mode: dropout is identity
]



def ids(configs):
    return ["-".join(f"{k}={v}" for k, v in c.items()) + f"-{'x'.join(map(str, s))}" for c, s in configs]


# The low-precision subset: non-multiples of the window, global pooling, the softmax gate.
LOW_PRECISION = [CONFIGS[2], CONFIGS[5], CONFIGS[8]]

# float64 inputs, parameters, outputs and every gradient computed by the official module.
GOLDEN = torch.load(Path(__file__).parent / "data" / "official_scsa_fp64.pt", weights_only=True)


def golden_id(case):
    return "-".join(f"{k}={v}" for k, v in case["config"].items()).replace(" ", "")


# (config, input shape) with non-finite inputs: a map with several windows (N > 1), and one window
# (the rank-one attention).
NONFINITE_CASES = [(dict(dim=16, head_num=2), (2, 16, 9, 16)),
                   (dict(dim=16, gate_layer="softmax", qkv_bias=True), (2, 16, 7, 7))]


def random_inputs(shape, dtype, device, seed=1):
    """(x, upstream gradient) drawn in fp64, then cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype),
            torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype))
