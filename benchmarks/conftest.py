"""Lets ``pytest benchmarks/`` collect the ``bench_<op>.py`` files (pytest collects test_*.py by default),
and runs them under the runner's CPU allocator setting (see ``--default-malloc`` in __main__.py)."""

import pytest
import torch

from pyllm.train import host_memory


def pytest_configure(config):
    if not torch.cuda.is_available():
        host_memory.keep_freed_memory()  # as `python -m benchmarks` and the trainer do on a CPU


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself; collecting it here too would double it
    if (file_path.name.startswith("bench_") and file_path.suffix == ".py"
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
