import numpy as np
import pytest
import torch

from companion.glue import glue


def test_glue_returns_python_numbers_for_numpy_and_torch_scalars():
    assert type(glue("a", np.float64(1.5))) is float
    assert type(glue("b", torch.tensor(3))) is int
    assert glue("c", "RTX A6000 (48 GB)") == "RTX A6000 (48 GB)"
    assert glue("d", [1, 2]) == [1, 2]


def test_glued_strings_display_without_quotes():
    from IPython.lib.pretty import pretty

    from companion.glue import PlainText

    assert pretty(PlainText("RTX A6000 (48 GB)")) == "RTX A6000 (48 GB)"
    assert pretty("RTX A6000 (48 GB)") == "'RTX A6000 (48 GB)'"


def test_claim_raises_in_the_ci_profile_and_prints_a_note_in_the_gpu_profile(capsys):
    import torch

    from companion.glue import claim
    from companion.profiles import Profile

    ci = Profile("ci", torch.device("cpu"), torch.float32, 0)
    gpu = Profile("gpu", torch.device("cpu"), torch.float16, 0)
    assert claim(True, "fine", ci) is True and claim(True, "fine", gpu) is True
    with pytest.raises(AssertionError, match="the loss ends above its minimum"):
        claim(False, "the loss ends above its minimum", ci)
    assert claim(False, "the loss ends above its minimum", gpu) is False
    assert "does not hold: the loss ends above its minimum" in capsys.readouterr().out
