"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """For modules of tiny networks: a second intra-op thread only adds OpenMP wake-up
    costs, which on a busy shared machine made each small op several times slower.
    The thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
