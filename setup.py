"""Build of attrkernels._C, the C++ CPU kernels (metadata lives in pyproject.toml).

Each kernel is compiled once per instruction set from the same source (csrc/cpu/sketch_<isa>.cpp
includes sketch_impl.inc) with that set's flags only, and module.cpp picks the best build the
CPU supports at run time, so the default wheel runs on any x86-64 CPU and never uses
-march=native. ATTRKERNELS_NATIVE=1 adds -march=native to every file (for a build that stays on
the machine it was built on).
"""
import os
import platform
import shutil
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
ISAS = ["avx512", "avx2", "generic"] if X86 else ["generic"]
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
if os.environ.get("ATTRKERNELS_NATIVE") == "1":
    COMMON_FLAGS.append("-march=native")


def openmp_flags():
    if sys.platform == "darwin":  # Apple clang: libomp from Homebrew
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


class BuildExt(build_ext):
    """Adds each ISA file's own -m flags when it is compiled."""

    def build_extensions(self):
        compiler = self.compiler
        original = compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            name = os.path.basename(src)
            extra = list(extra_postargs)
            for isa, flags in ISA_FLAGS.items():
                if name == f"sketch_{isa}.cpp":
                    extra += flags
            return original(obj, src, ext, cc_args, extra, pp_opts)

        compiler._compile = compile_one
        try:
            super().build_extensions()
        finally:
            compiler._compile = original


class BuildPy(build_py):
    """Ships csrc/cuda/*.cu inside the package (attrkernels/_cuda), where CuPy compiles them."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "attrkernels" / "_cuda"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path("csrc/cuda").glob("*.cu")) + sorted(Path("csrc/cuda").glob("*.cuh")):
            shutil.copy2(src, target / src.name)


omp_compile, omp_link = openmp_flags()
sources = ["csrc/cpu/module.cpp"] + [f"csrc/cpu/sketch_{isa}.cpp" for isa in ISAS]
ext_modules = []
if os.environ.get("ATTRKERNELS_NO_EXT") != "1":
    ext_modules.append(
        Pybind11Extension(
            "attrkernels._C",
            sources,
            include_dirs=["csrc/cpu"],
            cxx_std=17,
            extra_compile_args=COMMON_FLAGS + omp_compile,
            extra_link_args=omp_link,
            depends=["csrc/cpu/sketch_impl.inc", "csrc/cpu/philox.hpp", "csrc/cpu/sketch.hpp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
