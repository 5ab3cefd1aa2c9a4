"""Which implementation runs a call: the backend chosen at construction, overridden by the
environment (SCSA_OPS_BACKEND=eager turns every fused path off), checked against the input's
device. Returns a provider for scsa_ops.autograd, or None for the eager math.

The decision depends only on constants (backend name, device, configuration): torch.compile runs
it once while tracing (torch.compiler.assume_constant_result) and keeps the provider's name, so
loading a provider (imports, a JIT build, a GPU capability query) is never traced."""
import importlib.metadata
import os
import re
import warnings

import torch

BACKENDS = ("auto", "triton", "cpp", "eager")
ENV_VAR = "SCSA_OPS_BACKEND"
MIN_CUDA_CAPABILITY = (8, 0)  # bf16 loads and fp64 dots in the kernels
# The oldest triton the kernels run with: tl.gather (register regrouping) and fp64 tl.dot came with
# 3.3 (torch 2.7's pin). torch 2.6 pins 3.2: there the Triton path is off, with one warning.
MIN_TRITON = (3, 3)

_warned = set()
_triton = None
LOADED = {}  # namespace of the provider's ops -> provider, for every provider resolve() has handed out


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"SCSA: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def env_backend():
    """The backend SCSA_OPS_BACKEND names (overriding every module's), or None; a ValueError if it
    names none."""
    env = os.environ.get(ENV_VAR)
    if env and env not in BACKENDS:
        raise ValueError(f"SCSA: the environment variable {ENV_VAR} names an unknown backend {env!r}; expected one "
                         f"of {BACKENDS}, or unset it")
    return env


def _release(version):
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


def _triton_too_old():
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None  # said when the Triton path is asked for
    if _release(version) >= MIN_TRITON:
        return None
    return (f"triton {version} is older than triton {'.'.join(map(str, MIN_TRITON))}, the oldest the kernels run with "
            f"(torch {torch.__version__} is installed, and pins it); the Triton path is off, the C++ and eager paths "
            "are unaffected: torch >= 2.7 brings a triton that runs them")


# Why the installed triton cannot run the kernels, or None: read once, from the package's metadata
# (no import of triton), at import time (a look-up of metadata cannot be traced by torch.compile).
TRITON_TOO_OLD = _triton_too_old()


def warn_if_triton_too_old():
    """At import: one warning if the installed triton cannot run the kernels."""
    if TRITON_TOO_OLD is not None:
        _warn_once(f"SCSA: {TRITON_TOO_OLD}")


def triton_provider():
    """(provider, None) or (None, why it is unavailable)."""
    global _triton
    if _triton is None:
        if TRITON_TOO_OLD is not None:
            _triton = (None, TRITON_TOO_OLD)
            return _triton
        try:
            from .ops.triton import provider
            _triton = (provider, None)
        except ImportError as e:  # no wheel for this platform, or a broken install
            _triton = (None, f"Triton is not importable ({e})")
    return _triton


_compiled = {}  # CUDA device -> None if the kernels compiled and ran there, else why not


def first_compile(provider, device):
    """None if the kernels compile and run on `device`, else why not: one small forward and backward
    in fp32, once a process and device, so that a triton whose compiler cannot build them (a release
    no test has seen) turns the Triton path off with a warning instead of failing a user's step."""
    if device not in _compiled:
        from .autograd import Config, fused_scsa
        from .functional import module_params
        from .reference import SCSA as Reference

        try:
            x = torch.randn(2, 8, 14, 14, device=device, requires_grad=True)
            params = [None if p is None else p.to(device) for p in module_params(Reference(8, head_num=2))]
            fused_scsa(x, params, Config(2, 7, "sigmoid"), provider).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _compiled[device] = None
        except Exception as e:  # a compiler error, a missing API, a launch failure: the Triton path cannot run
            import triton

            _compiled[device] = (f"triton {triton.__version__} with torch {torch.__version__} failed to compile or run "
                                 f"the kernels ({type(e).__name__}: {str(e)[:300]})")
    return _compiled[device]


def _triton_for(device):
    provider, why = triton_provider()
    if provider is None:
        return None, why
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CUDA_CAPABILITY:
            return None, (f"the Triton kernels need a GPU of compute capability >= {MIN_CUDA_CAPABILITY}, "
                          f"{torch.cuda.get_device_name(device)} has {cap}")
        why = first_compile(provider, device)
        return (None, why) if why else (provider, None)
    from .ops.triton import utils  # imported with the provider above

    if device.type == "cpu" and utils.INTERPRET:  # the mode triton.jit took when the kernels were defined
        return provider, None
    return None, (f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
                  f"imported to run its kernels on the CPU; got a tensor on {device}")


def _cpp_for(device):
    if device.type != "cpu":
        return None, f"backend='cpp' needs a CPU tensor, got a tensor on {device}"
    from .ops import cpp

    return cpp.load()


def resolve(backend, device, fusable):
    """Provider for a call on `device`, or None for eager. `fusable`: the configuration has a
    fused path. (The input's shape limits are the caller's: provider.fits.)"""
    ns = _resolve_name(backend, device, fusable)
    return None if ns is None else LOADED[ns]


_resolved = {}  # (environment variable, backend, device, fusable) -> _decide's answer


@torch.compiler.assume_constant_result
def _resolve_name(backend, device, fusable):
    """The namespace of the provider of a call, decided once per (environment variable, backend,
    device, fusable): this runs on every call, and the decision may query the GPU."""
    key = (env_backend(), backend, device, fusable)
    try:
        return _resolved[key]
    except KeyError:
        ns = _resolved[key] = _decide(key[0] or backend, device, fusable)
        return ns


def _decide(backend, device, fusable):
    if backend == "eager" or not fusable:
        return None
    if backend == "auto":
        provider, why = _triton_for(device) if device.type == "cuda" else _cpp_for(device)
        if provider is None:
            _warn_once(f"SCSA: backend='auto' falls back to the eager module: {why}")
    else:
        provider, why = (_triton_for if backend == "triton" else _cpp_for)(device)
        if provider is None:
            raise RuntimeError(f"SCSA: backend={backend!r} is unavailable: {why}")
    if provider is None:
        return None
    LOADED[provider.ns] = provider
    return provider.ns
