import os

import pytest
import torch


# CI has two CPU cores and several tests start subprocesses (DDP workers, killed trainings): one
# thread per process avoids oversubscription, which was measured to slow steps down up to 40x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one intra-op thread, whatever an earlier test set."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def threads():
    """``threads(n)`` sets the intra-op thread count for the test (restored afterwards)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def kernels_on():
    """moelab's compiled CPU kernels on for the test, whatever ``MOELAB_CPU_KERNELS`` says."""
    from moelab.diffusion import kernels

    with kernels.enabled(True):
        yield
