"""Fixtures for the core tests.

The core tests run thousands of ops on tensors of a few dozen elements. Kernels such as softmax and
log_sigmoid enter an OpenMP parallel region whatever the size, and waking the thread pool costs
milliseconds on a small shared VM, more than the math. One intra-op thread makes the suite about twice
as fast; the setting is restored after each module so other tests are unaffected.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
