"""Build ddpm_fast: the Python package plus the native module ddpm_fast._C, built by CMake + Ninja.

Environment:
  DDPM_FAST_NATIVE=ON|OFF           build ddpm_fast._C at all (default ON; OFF: a pure-Python
                                    package on torch and Triton paths, built in seconds)
  DDPM_FAST_CUDA=AUTO|ON|OFF        build the CUDA kernels (default AUTO: when nvcc is found)
  DDPM_FAST_CUDA_ARCHS="80;86;89;90"  CUDA architectures
  DDPM_FAST_BUILD_JOBS=N            parallel compile jobs
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fresh build folder each time: a cached CMake configuration can point at the ninja of
        # a pip build environment that no longer exists.
        build_dir = Path(tempfile.mkdtemp(prefix="ddpm_fast_build_"))
        cuda = os.environ.get("DDPM_FAST_CUDA", "AUTO").upper()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDDPM_FAST_CUDA={cuda}",
            "-G", "Ninja",
        ]
        if os.environ.get("DDPM_FAST_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['DDPM_FAST_CUDA_ARCHS']}")
        jobs = os.environ.get("DDPM_FAST_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


native = os.environ.get("DDPM_FAST_NATIVE", "ON").upper()
if native not in ("ON", "OFF"):
    sys.exit(f"DDPM_FAST_NATIVE must be ON or OFF, got {native!r}")
setup(ext_modules=[CMakeExtension("ddpm_fast._C")] if native == "ON" else [],
      cmdclass={"build_ext": CMakeBuild})
