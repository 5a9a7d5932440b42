"""Test configuration: Triton kernels run on the CPU through its interpreter when no GPU is here;
a fixture for modules of small problems that run on one torch thread."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread():
    """One torch thread, for modules of small problems (marked with it): one thread is fastest
    there, it is how the retraining workers train, and two threads spin on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
