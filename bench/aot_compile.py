"""Compile, for real GPU targets and without a GPU, every Triton kernel variant that realistic
shapes launch; report registers and spills from ptxas. Run without TRITON_INTERPRET (the
interpreter accepts code the GPU compiler rejects). Prints one JSON line per compiled variant.

    python -m bench.aot_compile [sm ...] [--shard I/N]   # default: 80 90; --shard: every Nth variant from I
"""
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.kernels import LaunchRecorder, all_kernels  # noqa: E402
from scsa_ops import SCSA  # noqa: E402
from scsa_ops.backends import triton_provider  # noqa: E402
from scsa_ops.function import fused_scsa  # noqa: E402

# ResNet-50 stages, a detection stage-1 map, a wide MobileNetV2 layer; both gate kinds, bias,
# global pooling. fp16 compiles as bf16 does (same 16-bit loads, same fp32 math): bf16 stands
# for both, and one shape stands for fp64 (verification only), keeping the cold compile of both
# targets within a few minutes on 2 cores.
SHAPES = [
    (dict(dim=64), (2, 64, 56, 56), (torch.float32, torch.bfloat16, torch.float64)),
    (dict(dim=512, head_num=8, qkv_bias=True), (2, 512, 7, 7), (torch.float32, torch.bfloat16)),
    (dict(dim=64, gate_layer="softmax"), (1, 64, 200, 333), (torch.float32, torch.bfloat16)),
    (dict(dim=960, window_size=-1), (1, 960, 14, 14), (torch.float32, torch.bfloat16)),
]
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def collect():
    rec = LaunchRecorder(execute=False)
    provider = triton_provider()[0]
    for cfg, shape, dtypes in SHAPES:
        for dtype in dtypes:
            m = SCSA(**cfg).to(dtype)
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            out = fused_scsa(x, m.state_dict_params(), m.config, provider)
            out.backward(torch.ones_like(out))
    variants = {}
    kernels = all_kernels()
    for name, args, kwargs in rec.launches:
        fn = kernels[name]
        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps", 4)
        sig, consts = {}, {}
        for param, arg_name, val in zip(fn.params, fn.arg_names, args):
            if isinstance(val, torch.Tensor):
                sig[arg_name] = "*" + TYPES[val.dtype]
            elif isinstance(val, bool):
                sig[arg_name] = "i1"
            elif isinstance(val, int):
                sig[arg_name] = "i64" if abs(val) >= 2 ** 31 else "i32"
            else:  # a float: fp32 unless annotated (the JIT's own rule)
                sig[arg_name] = param.annotation_type or "fp32"
        for arg_name, val in kwargs.items():
            sig[arg_name] = "constexpr"
            consts[arg_name] = val
        key = (name, json.dumps(sig, sort_keys=True), repr(sorted(consts.items())), num_warps)
        variants[key] = (name, fn, sig, consts, num_warps)
    return list(variants.values())


def spills(ptx, arch):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # The flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py), plus -v.
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                              f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                              src, "-o", os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = max(int(r) for r in re.findall(r"Used (\d+) registers", log))
    spill = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spill


def main(archs, shard=(0, 1)):
    for name, fn, sig, consts, num_warps in collect()[shard[0]::shard[1]]:
        for arch in archs:
            src = ASTSource(fn, sig, consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            regs, spill = spills(compiled.asm["ptx"], arch)
            consts_s = {k: str(v) for k, v in consts.items()}
            print(json.dumps(dict(kernel=name, sm=arch, num_warps=num_warps, regs=regs, spill_bytes=spill,
                                  constexprs=consts_s,
                                  ptr_types=sorted({v for v in sig.values() if v.startswith("*")}))),
                  flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    shard = (0, 1)
    if "--shard" in args:
        at = args.index("--shard")
        shard = tuple(int(v) for v in args[at + 1].split("/"))
        del args[at:at + 2]
    main([int(a) for a in args] or [80, 90], shard)
