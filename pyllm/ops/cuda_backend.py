"""The "cuda" backend: the CUDA C++ kernels of ``pyllm._C`` (csrc/cuda)."""

import torch

from pyllm import _C  # noqa: F401  (an ImportError here marks the backend unavailable)

if not torch.cuda.is_available():
    raise ImportError("no CUDA device visible to torch")
