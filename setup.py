"""Build script: the pure-Python package plus the C++ CPU extension, one module per instruction set
(scsa_ops._C_default_<torch>, _C_avx2_<torch>, _C_avx512_<torch> on x86-64, named after the torch
build they are compiled against; scsa_ops/_build.py says why), with ninja.

Install with `pip install -e . --no-build-isolation` so the extension is compiled against the torch
already installed. Set SCSA_OPS_NO_EXT=1 to skip it: the package then builds it on first use
(torch.utils.cpp_extension.load) or, failing that, falls back to eager with a warning. A wheel
(`pip wheel . --no-build-isolation`) carries every module and a copy of csrc/ for that fallback."""
import copy
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithSources(build_py):
    """The package plus csrc/ as scsa_ops/csrc: the JIT fallback of an installed wheel compiles it."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "scsa_ops" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").glob("*.[ch]*")):
            shutil.copy2(src, target / src.name)


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("SCSA_OPS_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # scsa_ops/_build.py by path: importing the package itself would import its Python modules.
    spec = importlib.util.spec_from_file_location("_scsa_build", ROOT / "scsa_ops" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)

    class BuildPerISA(BuildExtension):
        """Each instruction set's objects in a directory of their own (the modules compile the same
        sources with different flags), always under build/ in the source tree, so that every build
        of this checkout (the editable install's, `pip wheel .`'s) reuses them through ninja. The
        modules are independent and each is one long compile (its passes unit), so they build at
        once (setuptools' --parallel), not one after another on one core; MAX_JOBS, which caps
        each module's ninja, caps their number too."""

        def finalize_options(self):
            super().finalize_options()
            if self.parallel is None:
                jobs = os.environ.get("MAX_JOBS", "")
                self.parallel = min(len(self.extensions), int(jobs)) if jobs.isdigit() else len(self.extensions)

        def build_extension(self, ext):
            # A copy of the command per module: the parallel build runs this in threads, and the
            # compile and the link read their directory from the command's build_temp.
            command = copy.copy(self)
            command.build_temp = str(ROOT.resolve() / "build" / "objects" / ext.name)
            BuildExtension.build_extension(command, ext)

    srcs = [os.path.relpath(s, ROOT) for s in build.build_sources(ROOT / "build" / "passes")]
    ext_modules = [CppExtension(build.module_name(isa), srcs, extra_compile_args=build.cxx_flags(isa),
                                extra_link_args=build.ld_flags())
                   for isa in build.built_isas()]
    cmdclass["build_ext"] = BuildPerISA.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
