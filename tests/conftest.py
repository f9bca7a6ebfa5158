"""Shared test setup: no hub access, deterministic, quiet."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
if "OMP_WAIT_POLICY" not in os.environ:  # before torch loads: share the cores (companion/__init__.py)
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
