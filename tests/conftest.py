"""Fixtures shared across test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: small ops on shared 2-core machines are far faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
