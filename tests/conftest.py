"""Fixtures shared across test files."""

from __future__ import annotations

import os
import tempfile

# Tests never reach for the network, whoever starts them (make test exports these too); set before
# datasets and huggingface_hub read them at import.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
# derived caches (multiple-choice items) go to a directory of this run, not the user's ~/.cache/moe_slim
os.environ.setdefault("MOE_SLIM_CACHE", tempfile.mkdtemp(prefix="moe_slim-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: small ops on shared 2-core machines are far faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
