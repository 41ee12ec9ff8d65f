"""Thin build driver: CMakeLists.txt is the source of truth for csrc/; this file only runs CMake (through
pybind11's CMake package) and puts the resulting pyllm._C where setuptools expects it.

Environment: PYLLM_CUDA (AUTO/1/0), PYLLM_CUDA_ARCHS (e.g. "80;90a") are read by CMakeLists.txt;
CMAKE_BUILD_PARALLEL_LEVEL sets the build jobs (default: the number of CPUs); CMAKE_ARGS adds arguments;
PYLLM_PREBUILT=1 keeps an existing pyllm._C instead of building (.ci/gpu uses it).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])  # CMake knows the sources


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement (pyproject.toml [build-system])

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        inplace = ROOT / self.get_ext_filename(ext.name)  # pyllm/_C.<abi>.so in the checkout
        if os.environ.get("PYLLM_PREBUILT") == "1" and inplace.exists():
            # .ci/gpu sets this only when the module was built from the same csrc/ (a lent GPU machine
            # starts bare each call; rebuilding the CUDA kernels there would cost minutes of device time).
            # An editable install builds into a temporary directory and copies from there: copy into it.
            if inplace.resolve() != target:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(inplace, target)
            print(f"PYLLM_PREBUILT=1: using {inplace.name} as it is")
            return
        out_dir = target.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            *os.environ.get("CMAKE_ARGS", "").split(),
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    # kernels/ and benchmarks/ live at the top level of the repository and are installed as
    # pyllm.kernels and pyllm.benchmarks (so `pyllm bench` works from anywhere).
    packages=find_packages(include=["pyllm", "pyllm.*"]) + ["pyllm.kernels", "pyllm.benchmarks"],
    package_dir={"pyllm.kernels": "kernels", "pyllm.benchmarks": "benchmarks"},
    ext_modules=[CMakeExtension("pyllm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
