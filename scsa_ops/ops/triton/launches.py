"""Every Triton kernel of the package, and a recorder of their launches: what the tests count and
bench/gpu_model.py binds and models. Nothing in the package imports it."""
import importlib
import pkgutil

from .. import triton as triton_ops


def all_kernels():
    """{name: kernel} for every `_*_kernel` defined in scsa_ops/ops/triton/."""
    found = {}
    for info in pkgutil.iter_modules(triton_ops.__path__):
        mod = importlib.import_module(f"{triton_ops.__name__}.{info.name}")
        found.update({n: k for n, k in vars(mod).items() if n.startswith("_") and n.endswith("_kernel")})
    return found


class LaunchRecorder:
    """Wraps each kernel's `run` (what `kernel[grid](...)` calls) to log (name, args, kwargs);
    with execute=False the kernel body is skipped, so launch configurations of large shapes can
    be collected without a GPU or the interpreter's cost. keep=False counts the launches only
    (`count`): a log would keep every launch's tensors alive, so that each call allocates afresh
    (on the CPU, an mmap per large tensor) where a GPU run reuses the caching allocator's blocks,
    which made the host time per call (bench.gpu_model --host) look twice what it is."""

    def __init__(self, monkeypatch=None, execute=True, keep=True):
        self.launches, self.grids, self.count, self.active, self._restore = [], [], 0, 0, []
        for name, kernel in all_kernels().items():
            self._wrap(monkeypatch, name, kernel, execute, keep)

    def _wrap(self, monkeypatch, name, kernel, execute, keep):
        real = kernel.run

        def run(*args, grid, warmup, **kwargs):
            self.count += 1
            if keep:
                self.launches.append((name, args, kwargs))
                self.grids.append(grid)
            if not execute:
                return None
            self.active += 1
            try:
                return real(*args, grid=grid, warmup=warmup, **kwargs)
            finally:
                self.active -= 1

        if monkeypatch is not None:
            monkeypatch.setattr(kernel, "run", run)
        else:
            kernel.run = run
            self._restore.append((kernel, real))

    def restore(self):
        """Put the kernels' own `run` back (a recorder made without monkeypatch)."""
        for kernel, real in self._restore:
            kernel.run = real
        self._restore.clear()

    def names(self):
        return [n for n, _, _ in self.launches]
