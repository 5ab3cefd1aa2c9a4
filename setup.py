"""Build script. The C++ CPU extension from csrc/ is built here once csrc/ holds sources;
until then this installs the pure-Python package only (the Triton path needs no build)."""
import glob

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("scsa_ops._C", sources, extra_compile_args=["-O3"])]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
