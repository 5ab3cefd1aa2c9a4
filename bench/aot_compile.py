"""Compile, for real GPU targets and without a GPU, every Triton kernel variant that realistic
shapes launch, bound as Triton's JIT binds a launch (bench.gpu_model.bind: the same
specialisation, so what compiles here is what a GPU run compiles); report registers and spills.
Run without TRITON_INTERPRET (the interpreter accepts code the GPU compiler rejects). Prints one
JSON line per compiled variant.

    python -m bench.aot_compile [sm ...] [--shard I/N]   # default: 80 90; --shard: every Nth variant from I
"""
import argparse
import json
import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from bench.gpu_model import bind, ptxas_report, record  # noqa: E402
from scsa_ops import SCSA  # noqa: E402
from scsa_ops.ops.triton.launches import all_kernels  # noqa: E402

# ResNet-50 stages, a detection stage-1 map, a wide MobileNetV2 layer; both gate kinds, bias,
# global pooling. fp16 compiles as bf16 does (same 16-bit loads, same fp32 math): bf16 stands
# for both, and one shape stands for fp64 (verification only); the wide map in bf16 and global
# pooling in fp32 only (the other dtype's code is the other shapes'): 62 variants, so that a cold
# compile for sm_90 fits a test's time on one core.
SHAPES = [
    (dict(dim=64), (2, 64, 56, 56), (torch.float32, torch.bfloat16, torch.float64)),
    (dict(dim=512, head_num=8, qkv_bias=True), (2, 512, 7, 7), (torch.float32, torch.bfloat16)),
    (dict(dim=64, gate_layer="softmax"), (1, 64, 200, 333), (torch.bfloat16,)),
    (dict(dim=960, window_size=-1), (1, 960, 14, 14), (torch.float32,)),
]


def collect(arch):
    """Every distinct variant the SHAPES' forward and backward launch, bound by the JIT's own binder
    (bench.gpu_model.bind: the specialisation a launch on sm_<arch> compiles): [(name, source,
    options)]."""
    kernels, variants = all_kernels(), {}
    for cfg, shape, dtypes in SHAPES:
        for dtype in dtypes:
            for _, name, args, kwargs, _ in record(SCSA(**cfg).to(dtype), torch.randn(shape, dtype=dtype)):
                _, src, options = bind(kernels[name], args, kwargs, arch)
                variants.setdefault((src.hash(), str(options)), (name, src, options))
    return list(variants.values())


def main(archs, shard=(0, 1)):
    for arch in archs:
        for name, src, options in collect(arch)[shard[0]::shard[1]]:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
            regs, spill = ptxas_report(compiled.asm["ptx"], arch)
            print(json.dumps(dict(kernel=name, sm=arch, num_warps=options.num_warps, regs=regs, spill_bytes=spill,
                                  constexprs={str(k): str(v) for k, v in src.constants.items()},
                                  ptr_types=sorted({v for v in src.signature.values() if v.startswith("*")}))),
                  flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sm", nargs="*", type=int, default=[80, 90], help="targets (default: 80 90)")
    ap.add_argument("--shard", default="0/1", help="I/N: every Nth variant from the Ith")
    args = ap.parse_args()
    main(args.sm, tuple(int(v) for v in args.shard.split("/")))
