"""The C++ provider: torch.ops.scsa_cpp (csrc/ops.cpp), called through library.Provider.

Loading, once per process: the extension setup.py built (scsa_ops._C); if it is missing or does
not import (installed without a build, built for another torch), it is compiled with
torch.utils.cpp_extension.load (ninja) into a per-torch cache and a log line says so; if that
fails too, `load()` returns the reason and the backends fall back to eager (auto) or raise (cpp)."""
import importlib
import logging

from .. import _build, schema
from . import library

log = logging.getLogger("scsa_ops")

_state = None


def _jit():
    path = _build.jit_build_dir()
    log.warning("SCSA: scsa_ops._C is not built for this install; compiling the C++ extension "
                "with torch.utils.cpp_extension.load into %s (first use only)", path)
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(name=_build.JIT_NAME, sources=_build.sources(), extra_cflags=_build.cxx_flags(),
                          extra_ldflags=_build.ld_flags(), build_directory=path, verbose=False)


def _import(jit):
    try:
        return importlib.import_module("scsa_ops._C"), None
    except ImportError as e:
        built_why = f"scsa_ops._C does not import ({e})"
    if not jit:
        return None, built_why
    if not _build.sources():
        return None, f"{built_why}, and the C++ sources ({_build.CSRC}) are not available to build it"
    try:
        return _jit(), None
    except Exception as e:  # compiler missing, ninja missing, build error: all mean "no C++ path"
        return None, f"{built_why}, and building it with torch.utils.cpp_extension.load failed: {e}"


def _any_width(w, window_w):
    return True  # rows are streamed in vectors: no width limit


def load(jit=True):
    """(the provider, None) or (None, why the C++ path is unavailable). jit=False (import time) uses
    only an extension already built, compiling nothing, and leaves the answer open when there is
    none: the first fused call may then build it."""
    global _state
    if _state is None:
        ext, why = _import(jit)
        if ext is None and not jit:
            return None, why
        if ext is not None:
            here = _build.capability()
            if _build.ISA_ORDER.index(ext.capability) > _build.ISA_ORDER.index(here):
                ext, why = None, (f"scsa_ops._C was built for {ext.capability} instructions and this CPU "
                                  f"runs torch at {here}; reinstall to rebuild it here")
        if ext is not None:
            schema.define("scsa_cpp")
            library.register_fakes("scsa_cpp")
        _state = (None, why) if ext is None else (library.Provider("scsa_cpp", _any_width), None)
    return _state
