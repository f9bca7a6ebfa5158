import os

import pytest
import torch

from companion.profiles import PROFILES, check_profile, require_cuda, seed_everything, setup_profile


def test_ci_profile_runs_on_cpu_offline_in_float32():
    prof = setup_profile("ci", seed=3)
    assert prof.device.type == "cpu" and prof.dtype == torch.float32 and prof.is_ci
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unknown_profile_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"PROFILE must be one of \('ci', 'gpu'\), got 'cuda'"):
        check_profile("cuda")
    assert PROFILES == ("ci", "gpu")


def test_gpu_profile_without_cuda_stops_with_instructions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*Colab.*PROFILE = 'ci'"):
        setup_profile("gpu")
    with pytest.raises(RuntimeError, match="4-bit demo needs a CUDA GPU"):
        require_cuda("4-bit demo")


def test_seed_everything_repeats_random_draws():
    seed_everything(7)
    a = torch.randn(5), torch.rand(1).item()
    seed_everything(7)
    b = torch.randn(5), torch.rand(1).item()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
