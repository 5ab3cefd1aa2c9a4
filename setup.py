"""Build script: the pure-Python package plus the C++ CPU extension scsa_ops._C (csrc/, ninja).

Install with `pip install -e . --no-build-isolation` so the extension is compiled against the torch
already installed. Set SCSA_OPS_NO_EXT=1 to skip it: the package then builds it on first use
(torch.utils.cpp_extension.load) or, failing that, falls back to eager with a warning."""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SCSA_OPS_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # scsa_ops/_build.py by path: importing the package itself would import its Python modules.
    spec = importlib.util.spec_from_file_location("_scsa_build", Path(__file__).parent / "scsa_ops" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    srcs = [os.path.relpath(s) for s in build.sources()]
    ext_modules = [CppExtension(build.NAME, srcs, extra_compile_args=build.cxx_flags(),
                                extra_link_args=build.ld_flags())]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
