"""Launch tables for multi-tensor kernels (loss-scale unscale, AdamW): one launch over many tensors.

A model's gradients are hundreds of tensors of very different sizes; one launch per tensor costs
~5 us of launch overhead each and leaves the GPU idle on the small ones. Instead (as in Apex's
multi_tensor_apply) every tensor is cut into chunks of CHUNK elements and a device table lists, per
chunk, the address of that chunk in each tensor list, its element count and each tensor's dtype
code; program i of one launch reads row i of the table and processes that chunk.

The table is built on the host from data pointers. To avoid a host-device synchronisation each step
it is cached by (addresses, sizes, dtypes): a hit reuses the device table as is (the table holds only
addresses and sizes, so it is correct for any tensors at those addresses, even re-allocated ones);
a miss copies a pinned host buffer with ``non_blocking=True`` (no stream synchronisation), and the
pinned buffer is kept alive with the cache entry until the copy has surely finished.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

from . import launch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 32


def unsupported_reason(*lists) -> str | None:
    """Why these tensor lists cannot go through a chunk table (None if they can)."""
    for lst in lists:
        for t in lst or ():
            if t.dtype not in DTYPE_CODES:
                return f"dtype {t.dtype} not supported by the multi-tensor kernels"
            if not t.is_contiguous():
                return "a non-contiguous tensor in a multi-tensor list"
    return None


def chunk_table(lists: list[list[torch.Tensor]], chunk: int) -> torch.Tensor:
    """(n_chunks, 2 K + 1) int64 on the tensors' device: K chunk addresses, the chunk's element count,
    K dtype codes. All K lists have equal length and element-wise equal numel."""
    first = lists[0]
    key = (chunk, tuple((t.data_ptr(), t.numel(), t.dtype) for lst in lists for t in lst))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[0]
    K = len(lists)
    numel = np.array([t.numel() for t in first], dtype=np.int64)
    counts = -(-numel // chunk)  # chunks per tensor
    owner = np.repeat(np.arange(len(first)), counts)  # tensor index of every chunk
    first_chunk = np.cumsum(counts) - counts
    start = (np.arange(int(counts.sum()), dtype=np.int64) - first_chunk[owner]) * chunk  # element offset
    cols = [np.array([t.data_ptr() for t in lst], dtype=np.int64)[owner]
            + start * np.array([t.element_size() for t in lst], dtype=np.int64)[owner] for lst in lists]
    cols.append(np.minimum(chunk, numel[owner] - start))
    cols += [np.array([DTYPE_CODES[t.dtype] for t in lst], dtype=np.int64)[owner] for lst in lists]
    host = torch.from_numpy(np.stack(cols, axis=1).reshape(-1, 2 * K + 1).copy())
    device = first[0].device
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    else:
        table = host
    _CACHE[key] = (table, host)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table


def chunk_size() -> int:
    """Elements per chunk: 64k on a GPU (a few us of work per program), 512 in the interpreter so that
    tests with small tensors still cross chunk boundaries."""
    return 512 if launch.INTERPRET else 65536
