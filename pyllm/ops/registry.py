"""Backend registry: which implementation of an op runs, chosen at run time.

Backends: "torch" (the pure-PyTorch reference in ``reference.py``, always present), "triton"
(``pyllm.kernels``), "cuda" and "cpu" (the ``pyllm._C`` extension). Each non-reference backend lives in
its own module (``triton_backend.py``, ``cuda_backend.py``, ``cpu_backend.py``) that registers its
implementations with ``@register(op, backend)``; the module is imported lazily, the first time that
backend is asked for, so importing pyllm never fails because Triton, CUDA or ``_C`` is missing.

Selection, first match wins: the ``backend=`` argument of the call, then ``use_backend(...)`` (a context
manager; the model sets it from its config), then the ``PYLLM_BACKEND`` environment variable, then
"auto". "auto" means triton -> cuda -> torch for CUDA tensors and cpu -> torch for CPU tensors.

An implementation that cannot handle particular inputs (a dtype, a head dim, a device) raises
``Unsupported`` before doing any work; the dispatcher then falls back to the next candidate, ending at
the reference, and warns once per (op, backend, reason). ``PYLLM_STRICT_BACKEND=1`` turns an explicit
request that cannot be honoured into an error instead (the kernel tests use it).

Under ``torch.compile`` the selection runs while dynamo traces, and the compiled graph calls the chosen
implementation directly. Dynamo guards on the ``use_backend`` stack, so entering another block
recompiles; set the environment variables before the first compiled call (dynamo re-checks a variable
that was set when it traced, but does not notice one set afterwards).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
_BACKEND_MODULES = {
    "triton": "pyllm.ops.triton_backend",
    "cuda": "pyllm.ops.cuda_backend",
    "cpu": "pyllm.ops.cpu_backend",
}

_IMPLS: dict[str, dict[str, Callable]] = {}  # op -> backend -> implementation
_LOAD_ERRORS: dict[str, str | None] = {"torch": None}  # backend -> None (loaded) or why it is not
_WARNED: set[tuple[str, str, str]] = set()
_NO_IMPLS: dict[str, Callable] = {}
# use_backend() nesting. A plain list rather than a ContextVar: torch.compile (dynamo) can read it and
# guard on it, while it cannot trace ContextVar.get(). The stack is process-wide, not per thread.
_CONTEXT: list[str | None] = []


class Unsupported(Exception):
    """Raised by a backend implementation, before any work, for inputs it does not handle."""


class BackendError(RuntimeError):
    """An explicitly requested backend could not run the op and strict mode is on."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the ``backend`` implementation of ``op``."""
    check_backend_name(backend)

    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def check_backend_name(name: str, allow_auto: bool = False) -> str:
    valid = BACKENDS + (("auto",) if allow_auto else ())
    if name not in valid:
        raise ValueError(f"unknown backend {name!r}; valid backends are: {', '.join(valid)}")
    return name


@torch.compiler.assume_constant_result  # under torch.compile: run once while tracing, a constant after
def _load(backend: str) -> str | None:
    """Import a backend's module once; return None if it loaded, else the reason it did not."""
    if backend not in _LOAD_ERRORS:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
            _LOAD_ERRORS[backend] = None
        except Exception as e:  # ImportError, OSError from a missing .so, a CUDA driver mismatch...
            _LOAD_ERRORS[backend] = f"{type(e).__name__}: {e}"
    return _LOAD_ERRORS[backend]


def backends() -> dict[str, str]:
    """Each backend with "available" or the reason it is not (loads every backend module)."""
    return {b: ("available" if _load(b) is None else f"unavailable ({_load(b)})") for b in BACKENDS}


def ops_table() -> dict[str, list[str]]:
    """Each op and the backends that implement it (after loading every backend that loads)."""
    for b in BACKENDS:
        _load(b)
    return {op: sorted(impls) for op, impls in sorted(_IMPLS.items())}


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` ("auto" or None: automatic choice)."""
    if name is not None:
        check_backend_name(name, allow_auto=True)
    _CONTEXT.append(name)
    try:
        yield
    finally:
        _CONTEXT.pop()


# os.environ.get costs ~0.6 us for an unset variable (it raises and catches a KeyError inside), and the
# dispatcher reads PYLLM_BACKEND on every call of every op. os.environ keeps its contents in a dict that
# every write through os.environ updates; on POSIX (a CPython detail) it is keyed by bytes and a lookup
# costs ~0.05 us. Elsewhere, and while dynamo traces (it guards on os.environ reads), the plain read.
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON, dict):
    _ENVIRON = None


def _env(name: str) -> str | None:
    if _ENVIRON is None or torch.compiler.is_compiling():
        return os.environ.get(name)
    value = _ENVIRON.get(name.encode())
    return None if value is None else os.fsdecode(value)


_REQUESTS = frozenset(BACKENDS + ("auto",))


def requested_backend(backend: str | None = None) -> str:
    """The backend a call would ask for, before availability: argument, context, env, "auto"."""
    name = backend or (_CONTEXT[-1] if _CONTEXT else None) or _env("PYLLM_BACKEND") or "auto"
    return name if name in _REQUESTS else check_backend_name(name, allow_auto=True)


_CPU = torch.device("cpu")
_AUTO_CPU, _AUTO_CUDA = ("cpu", "torch"), ("triton", "cuda", "torch")
_EXPLICIT = {b: ((b,) if b == "torch" else (b, "torch")) for b in BACKENDS}


def _candidates(requested: str, device: torch.device) -> tuple[str, ...]:
    if requested == "auto":  # comparing devices costs 0.04 us, reading device.type 0.2 us
        return _AUTO_CPU if device == _CPU or device.type != "cuda" else _AUTO_CUDA
    return _EXPLICIT[requested]


@torch.compiler.assume_constant_result  # under torch.compile: warns while tracing (dynamo cannot trace warn)
def _warn_once(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"pyllm.ops.{op}: backend {backend!r} not used ({reason}); falling back",
                      RuntimeWarning, stacklevel=4)


def dispatch(op: str, device: torch.device, backend: str | None, *args, **kwargs):
    """Run ``op`` on the first candidate backend that accepts these inputs."""
    requested = requested_backend(backend)
    impls = _IMPLS.get(op, _NO_IMPLS)
    for b in _candidates(requested, device):
        reason = _load(b)
        impl = impls.get(b) if reason is None else None
        if impl is None:
            reason = reason or "op not implemented by this backend"
        else:
            try:
                return impl(*args, **kwargs)
            except Unsupported as e:
                reason = str(e)
        if b == requested:  # an explicit request that cannot be honoured: strict mode decides
            if _env("PYLLM_STRICT_BACKEND") == "1":
                raise BackendError(f"pyllm.ops.{op}: backend {b!r} cannot run these inputs: {reason}")
            _warn_once(op, b, reason)
    raise AssertionError(f"no implementation of {op}")  # unreachable: torch always implements it
