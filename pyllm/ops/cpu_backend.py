"""The "cpu" backend: the C++ kernels of ``pyllm._C`` (csrc/cpu), for float32 CPU tensors."""

from pyllm import _C  # noqa: F401  (an ImportError here marks the backend unavailable)
