"""Argument checks for the public ops: each failure names the argument and what was expected.

The checks run on every call, so each op first asks one cheap question (``floats_on`` plus a shape
comparison, ~1 us): are these the usual inputs? Only when the answer is no do the per-argument checks
below run, to accept the call or raise the message that names the problem. The fast question must
never accept what the full checks refuse; it may refuse what they accept (they then decide).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOATS = frozenset(FLOAT_DTYPES)


def floats_on(first, *others) -> bool:
    """True if ``first`` and each of ``others`` that is not None are floating-point tensors on ``first``'s
    device (the fast path's question; False means: run the full checks)."""
    if not isinstance(first, Tensor) or first.dtype not in _FLOATS:
        return False
    device = first.device
    for t in others:
        if t is not None and not (isinstance(t, Tensor) and t.dtype in _FLOATS and t.device == device):
            return False
    return True


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor(op: str, name: str, t, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES, like=None):
    """Check that argument ``name`` of ``op`` is a tensor of the right rank and dtype, on ``like``'s device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyllm.ops.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"pyllm.ops.{op}: argument '{name}' must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"pyllm.ops.{op}: argument '{name}' must have at least {min_ndim} dims, "
                         f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"pyllm.ops.{op}: argument '{name}' has dtype {_name(t.dtype)}, "
                        f"expected one of {', '.join(map(_name, dtypes))}")
    if like is not None and t.device != like.device:
        raise ValueError(f"pyllm.ops.{op}: argument '{name}' is on {t.device}, expected {like.device} "
                         f"(the device of the first input)")
    return t


def same_dtype(op: str, name: str, t, like, like_name: str):
    if t.dtype != like.dtype:
        raise TypeError(f"pyllm.ops.{op}: argument '{name}' has dtype {_name(t.dtype)}, expected "
                        f"{_name(like.dtype)} (the dtype of '{like_name}')")


def shape(op: str, name: str, t, expected: tuple, what: str = ""):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"pyllm.ops.{op}: argument '{name}' has shape {tuple(t.shape)}, expected "
                         f"{tuple(expected)}{' ' + what if what else ''}")


def choice(op: str, name: str, value, valid):
    if value not in valid:
        raise ValueError(f"pyllm.ops.{op}: argument '{name}'={value!r} is not one of {list(valid)}")


def integer(op: str, name: str, value):
    """Check that argument ``name`` of ``op`` is an integer (a Python or NumPy int, or a one-element integer
    tensor): not a bool, and not a float, even a whole one (the kernels take an int; one truncated 1.5 to 1)."""
    try:
        operator.index(value)
        ok = not isinstance(value, bool) and getattr(value, "dtype", None) is not torch.bool
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"pyllm.ops.{op}: argument '{name}'={value!r} must be an integer, got {type(value).__name__}")
