"""The two notebook profiles, ``ci`` and ``gpu``, and seeding.

Every notebook has one papermill ``parameters`` cell with ``PROFILE = "ci"``;
its next cell calls :func:`setup_profile`, which

* checks the profile name,
* fails fast, with a message saying what to do, when ``gpu`` is asked for on a
  machine without CUDA,
* switches the Hugging Face libraries offline in the ``ci`` profile, and
* seeds Python, NumPy and PyTorch so that a notebook run twice gives the same
  numbers.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

PROFILES = ("ci", "gpu")

# Environment variables that keep transformers / huggingface_hub / datasets off the network.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Profile:
    """What a notebook needs to know about the machine it runs on."""

    name: str  # "ci" or "gpu"
    device: torch.device
    dtype: torch.dtype  # compute dtype for 16-bit work: bf16 where supported, else fp16 (gpu) / fp32 (ci)
    seed: int

    @property
    def is_ci(self) -> bool:
        return self.name == "ci"


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy and PyTorch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is a known profile name, else raise ``ValueError``."""
    if profile not in PROFILES:
        raise ValueError(f"PROFILE must be one of {PROFILES}, got {profile!r}. "
                         "Use 'ci' for a CPU run in minutes, 'gpu' for real hub models on a CUDA GPU.")
    return profile


def require_cuda(what: str = "PROFILE = 'gpu'") -> None:
    """Raise a ``RuntimeError`` that says how to get a GPU when CUDA is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} needs a CUDA GPU, but torch.cuda.is_available() is False on this machine. "
            "On Colab choose Runtime > Change runtime type > T4 GPU and run again; on a local "
            "RTX card install a CUDA build of PyTorch (see the book's Setup page). "
            "To run on this CPU instead, set PROFILE = 'ci' in the parameters cell."
        )


def bf16_native() -> bool:
    """True when the GPU has native bfloat16 (compute capability >= 8.0: Ampere and newer).

    A Colab T4 is capability 7.5: use float16 compute there.
    """
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def setup_profile(profile: str, seed: int = 0) -> Profile:
    """Validate ``profile``, prepare the machine for it and seed everything."""
    check_profile(profile)
    if profile == "gpu":
        require_cuda()
        device = torch.device("cuda")
        dtype = torch.bfloat16 if bf16_native() else torch.float16
    else:
        for var in OFFLINE_ENV:
            os.environ[var] = "1"
        device = torch.device("cpu")
        dtype = torch.float32
    seed_everything(seed)
    return Profile(name=profile, device=device, dtype=dtype, seed=seed)
