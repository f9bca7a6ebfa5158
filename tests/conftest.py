"""Shared test setup: no hub access, deterministic, quiet."""

import os

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
if "OMP_WAIT_POLICY" not in os.environ:  # before torch loads: share the cores (companion/__init__.py)
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")


@pytest.fixture(scope="module")
def one_thread():
    """16-wide matrices on two shared cores: two threads spin-wait on each other and run 10-40x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
