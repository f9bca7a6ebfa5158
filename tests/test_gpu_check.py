"""scripts/gpu_check.py: its `ci` twin runs every check on a tiny Llama on the CPU; `gpu` needs CUDA."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ci_twin_prints_one_verdict_per_check_and_nothing_fails(gpu_check, capsys):
    assert gpu_check.main(["--profile", "ci"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("ci profile"):].splitlines()[1:]
    verdicts = {line.split("] ")[1].split(":")[0]: line[1:5].strip() for line in summary if line.startswith("[")}
    assert list(verdicts) == ["load-4bit", "qlora-bnb-paged", "qlora-companion-paged", "paged-equals-adamw",
                              "quantizer-bitexact"]
    exact = ("load-4bit", "paged-equals-adamw", "quantizer-bitexact")
    assert all(verdicts[c] == "PASS" for c in exact) and "FAIL" not in verdicts.values(), out
    assert "fell back to unpaged state on the CPU" in out  # bitsandbytes' paged optimizer on a CPU, honestly


def test_gpu_profile_without_cuda_stops_at_once_with_the_reason(gpu_check, capsys):
    assert not torch.cuda.is_available(), "this test describes a CPU-only machine"
    assert gpu_check.main(["--profile", "gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
