"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _hermetic_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's ~/.cache: one cache folder for the session
    (tests that need an empty one set DCGAN_CACHE themselves)."""
    monkeypatch.setenv("DCGAN_CACHE", str(_session_cache(tmp_path_factory)))


_CACHE: list = []


def _session_cache(tmp_path_factory):
    if not _CACHE:
        _CACHE.append(tmp_path_factory.mktemp("dcgan-cache"))
    return _CACHE[0]


@pytest.fixture
def one_thread():
    """For modules of tiny networks: a second intra-op thread only adds OpenMP wake-up
    costs, which on a busy shared machine made each small op several times slower.
    The thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
