import numpy as np
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
