"""Post-training tests run tiny models: one intra-op thread is faster than two on a shared 2-core
machine (no oversubscription); restored after each test so other test files are unaffected."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
