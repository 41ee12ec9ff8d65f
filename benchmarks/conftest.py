"""Lets ``pytest benchmarks/`` collect the ``bench_<op>.py`` files (pytest collects test_*.py by default)."""

import pytest


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself; collecting it here too would double it
    if (file_path.name.startswith("bench_") and file_path.suffix == ".py"
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
