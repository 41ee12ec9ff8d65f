"""The "triton" backend: registers the kernels of ``pyllm.kernels`` (one file per op in kernels/).

Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests them);
any other case raises ``Unsupported`` so the dispatcher falls back to the reference.
"""

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
