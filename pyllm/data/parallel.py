"""Ordered, bounded parallel map: the one way every data stage spreads work over cores (or a Ray cluster).

``ordered_map(fn, items, ...)`` yields ``fn(item)`` in input order. At most ``window`` items are in
flight, so a stream larger than memory stays a stream (``multiprocessing.Pool.imap`` would read its
whole input ahead). Because results come back in input order, anything computed from them is
independent of the number of workers and of their timing.

Engines:
- ``"local"`` with ``workers <= 1``: in this process (no pickling);
- ``"local"``: a ``ProcessPoolExecutor`` of spawned processes (safe with threads and torch). A worker that
  dies (killed, out of memory, a failing initializer, a script without a ``__main__`` guard) is an error;
  ``multiprocessing.Pool`` would replace it silently and wait forever for its result;
- ``"ray"``: Ray tasks on the cluster found by ``ray.init(address=...)`` (``address=None`` starts a local
  one); the same ``fn`` runs remotely with the same ``initializer``.

Why Ray tasks and not a Ray Data ``Dataset``: the pipeline's input is a Python generator that logs
corrupt input as it reads, and its output must come back in input order, a bounded window at a time.
``ray.data.from_items`` would first materialise the whole input, and Ray Data's own readers stop at the
first malformed record. An ordered window of remote tasks keeps both properties on any Ray cluster.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_WORKER_DIED = ("a data worker process died: it was killed (out of memory?), its initializer raised (see the "
                "traceback above), or a script that runs pyllm's data pipeline lacks `if __name__ == \"__main__\":` "
                "around its entry point (workers are spawned processes that import the script)")


def ordered_map(fn: Callable, items: Iterable, *, workers: int, initializer: Callable | None = None,
                initargs: tuple = (), engine: str = "local", ray_address: str | None = None,
                window: int | None = None) -> Iterator:
    window = window or max(2, 2 * workers)
    if engine == "ray":
        yield from _ray_map(fn, items, workers, initializer, initargs, ray_address, window)
        return
    if engine != "local":
        raise ValueError(f"engine={engine!r}: use 'local' or 'ray'")
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    # The initializer's arguments (configs, classifier weights) reach the workers through a file: spawn writes a
    # process's arguments into a pipe whose reading end the parent holds open until the write ends, so a child that
    # dies before reading them (a script without a __main__ guard) blocks the parent for good once they exceed the
    # pipe's 64 KiB (CPython gh-118981, present in 3.11).
    fd, init_file = tempfile.mkstemp(prefix="pyllm-initargs-", suffix=".pkl")
    with os.fdopen(fd, "wb") as f:
        pickle.dump((initializer, initargs), f)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_from_file,
                               initargs=(init_file,))
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise RuntimeError(_WORKER_DIED) from e
    finally:
        # after an error, Ctrl-C or a generator closed early: drop the queued items, wait only for the running ones
        pool.shutdown(cancel_futures=True)
        os.unlink(init_file)


def _init_from_file(path: str) -> None:
    with open(path, "rb") as f:
        initializer, initargs = pickle.load(f)
    if initializer is not None:
        initializer(*initargs)


def _ray_map(fn, items, workers, initializer, initargs, address, window) -> Iterator:
    try:
        import ray
    except ImportError:
        raise ImportError("engine='ray' needs the optional package 'ray': pip install 'ray[data]'") from None
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else max(workers, 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)

    run = ray.remote(_ray_task)
    # the initializer's arguments (configs, classifier weights) go to the object store once, not per task
    init_ref = ray.put(initargs)
    pending: deque = deque()
    for item in items:
        pending.append(run.remote(fn, initializer, init_ref, init_ref.hex(), item))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


_RAY_INITIALISED: set = set()


def _ray_task(fn, initializer, initargs, init_key, item):
    # A Ray worker process serves many tasks: run the initializer once per process and per map call
    # (init_key is the object id of its arguments). Defined at module level so Ray imports it by
    # reference and this set is the worker's own module global.
    if initializer is not None and init_key not in _RAY_INITIALISED:
        initializer(*initargs)
        _RAY_INITIALISED.add(init_key)
    return fn(item)
