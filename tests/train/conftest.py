import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The trainer tests' tensors are tiny: one intra-op thread is as fast, and on a loaded 2-core
    machine avoids OpenMP barrier stalls (measured 20x slower matmuls with 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
