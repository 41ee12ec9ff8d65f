"""Thin build driver: CMakeLists.txt is the source of truth for csrc/ (filled in by the csrc work)."""
from setuptools import find_packages, setup

setup(
    # kernels/ lives at the top level of the repository and is installed as pyllm.kernels.
    packages=find_packages(include=["pyllm", "pyllm.*"]) + ["pyllm.kernels"],
    package_dir={"pyllm.kernels": "kernels"},
)
