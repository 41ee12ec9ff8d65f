"""pyllm: a kernel-centric LLM training library.

Layers, bottom up: kernels (Triton in ``pyllm.kernels``, C++/CUDA in ``pyllm._C``) -> ``pyllm.ops``
(one function per op, backend chosen at run time) -> ``pyllm.model`` -> the stages ``pyllm.data``,
``pyllm.train``, ``pyllm.post``, ``pyllm.eval``. Importing pyllm never requires an optional part.
"""

__version__ = "0.1.0"
