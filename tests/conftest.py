"""Shared test configuration: device/dtype skip markers and the tolerance rule (pyllm/ops/tolerance.py).

Without a CUDA device, Triton kernels run in the interpreter (TRITON_INTERPRET=1), set here before any
kernel module is imported. The interpreter gets bf16 wrong (tl.dot and casts), so bf16 kernel tests
carry ``requires_gpu`` and run only on a GPU.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def kernel_dtypes():
    """dtypes a kernel test should cover on this machine: bf16 only on GPU (wrong in the interpreter)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
