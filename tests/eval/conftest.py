"""The evaluation tests run tiny models: one intra-op thread is as fast and avoids OpenMP spin-waits, which
slow tiny ops by orders of magnitude when another process holds a core."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
