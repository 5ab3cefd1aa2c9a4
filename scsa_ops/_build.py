"""How the C++ extension is compiled: shared by setup.py (ahead of time) and by the JIT fallback
(torch.utils.cpp_extension.load on first use), so both produce the same binary. Imports only torch.

The kernels use at::vec, whose instruction set is fixed at compile time (CPU_CAPABILITY): we
compile for the capability torch itself dispatches to on the building machine and record it, so a
binary moved to a machine without those instructions is refused with a reason, not a SIGILL."""
import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NAME = "scsa_ops._C"
JIT_NAME = "scsa_ops_C_jit"

# The at::vec instruction sets we build for, narrowest first (a binary runs on any CPU that has its
# set or a wider one).
ISA_ORDER = ("DEFAULT", "AVX2", "AVX512")
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def capability():
    """The at::vec capability to build for: torch's own choice on this machine (ATEN_CPU_CAPABILITY
    lowers it, as it does for torch)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ISA_ORDER else "DEFAULT"


def sources():
    return sorted(str(p) for p in CSRC.glob("*.cpp"))


def cxx_flags(cap=None):
    cap = cap or capability()
    flags = ["-O3", f"-DCPU_CAPABILITY={cap}"]
    if cap != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{cap}")
    flags += _ISA_FLAGS[cap]
    # at::parallel_for is inlined from the headers; it is OpenMP-parallel only if we compile with it.
    if "OpenMP" in torch.__config__.parallel_info():
        flags.append("-fopenmp")
    return flags


def ld_flags():
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def jit_build_dir():
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "scsa_ops")
    tag = f"torch{torch.__version__.replace('+', '_')}_{capability()}"
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path
