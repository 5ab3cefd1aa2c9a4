"""The C++ provider: torch.ops.scsa_cpp (csrc/ops.cpp), called through library.Provider.

Loading, once per process: of the extension modules setup.py built, one per instruction set
(scsa_ops._C_default_<torch>, _C_avx2_<torch>, _C_avx512_<torch>, named after the torch build they are
compiled against), the widest that torch itself dispatches to on this CPU
(scsa_ops/_build.py); if none imports (installed without a build, built for another torch), the
sources are compiled for that instruction set with torch.utils.cpp_extension.load (ninja) into a
per-torch cache and a log line says so; if that fails too, `load()` returns the reason and the
backends fall back to eager (auto) or raise (cpp)."""
import importlib
import logging

from .. import _build, schema
from . import library

log = logging.getLogger("scsa_ops")

_state = None
_capability = None  # the instruction set of the loaded kernels


def _jit(isa):
    path = _build.jit_build_dir()
    log.warning("SCSA: the C++ extension is not built for this install; compiling the C++ extension "
                "with torch.utils.cpp_extension.load for %s into %s (first use only)", isa, path)
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(name=_build.JIT_NAME, sources=_build.build_sources(path),
                          extra_cflags=_build.cxx_flags(isa), extra_ldflags=_build.ld_flags(), build_directory=path,
                          verbose=False)


def _import(jit):
    """(the extension module, None) or (None, why not). The widest built module this CPU runs, a
    narrower one if that does not import, else (jit=True) a build for this CPU's set."""
    here = _build.capability()
    failures = []
    for isa in reversed(_build.ISA_ORDER[:_build.ISA_ORDER.index(here) + 1]):
        name = _build.module_name(isa)
        try:
            ext = importlib.import_module(name)
        except ImportError as e:
            failures.append(f"{name} does not import ({e})")
            continue
        if isa != here:
            log.warning("SCSA: running the %s kernels on a CPU that runs torch at %s: %s", isa, here, failures[0])
        return ext, None
    built_why = "; ".join(failures)
    if not jit:
        return None, built_why
    if not _build.sources():
        return None, f"{built_why}, and the C++ sources ({_build.CSRC}) are not available to build them"
    try:
        return _jit(here), None
    except Exception as e:  # compiler missing, ninja missing, build error: all mean "no C++ path"
        return None, f"{built_why}, and building them with torch.utils.cpp_extension.load failed: {e}"


def _any_width(w, window_w):
    return True  # rows are streamed in vectors: no width limit


def load(jit=True):
    """(the provider, None) or (None, why the C++ path is unavailable). jit=False (import time) uses
    only an extension already built, compiling nothing, and leaves the answer open when there is
    none: the first fused call may then build it."""
    global _state, _capability
    if _state is None:
        ext, why = _import(jit)
        if ext is None and not jit:
            return None, why
        if ext is not None:
            schema.define("scsa_cpp")
            library.register_fakes("scsa_cpp")
            _capability = ext.capability
        _state = (None, why) if ext is None else (library.Provider("scsa_cpp", _any_width), None)
    return _state


def capability():
    """The instruction set of the C++ kernels this process runs ('DEFAULT', 'AVX2' or 'AVX512'),
    loading them if need be; None if the C++ path is unavailable."""
    load()
    return _capability
