"""companion.quant.codebooks against bitsandbytes' tables (bitsandbytes 0.50.2)."""

import numpy as np
import pytest
import torch
from bitsandbytes import functional as bnbF
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
from scipy.stats import norm

from companion.quant import (create_dynamic_map, create_normal_map, equal_bin_codebook, fp4_codebook, get_codebook,
                             int4_codebook, nf4_codebook, paper_eq4_levels, thresholds)

# research notes §1.2: the 16 NF4 values as bitsandbytes stores them
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_nf4_codebook_is_bitsandbytes_table_bit_for_bit():
    assert same_bits(nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert same_bits(nf4_codebook(), torch.tensor(NF4_TABLE, dtype=torch.float32))


@pytest.mark.parametrize("use_extra_value", [True, False])
def test_create_normal_map_matches_bitsandbytes_including_the_symmetric_variant(use_extra_value):
    assert same_bits(create_normal_map(use_extra_value=use_extra_value),
                     bnbF.create_normal_map(use_extra_value=use_extra_value))


def test_nf4_is_asymmetric_with_an_exact_zero_and_range_exactly_minus_one_to_one():
    code = nf4_codebook()
    assert (code < 0).sum() == 7 and (code == 0).sum() == 1 and (code > 0).sum() == 8
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0
    assert torch.all(code[1:] > code[:-1])  # sorted: code i is the i-th smallest value


def test_nf4_largest_raw_quantile_is_norm_ppf_of_the_offset():
    raw_max = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[0].item())
    assert raw_max == pytest.approx(1.848131, abs=1e-6)
    assert nf4_codebook()[-2].item() == pytest.approx(norm.ppf(torch.linspace(0.9677083, 0.5, 9)[1].item()) / raw_max,
                                                      abs=1e-7)


def test_a_float64_numpy_probability_grid_is_not_bit_exact():
    """Why the grid must be torch.linspace in float32 (research notes §1.3)."""
    pos = norm.ppf(np.linspace(0.9677083, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(0.9677083, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    numpy_code = torch.tensor(values / values.max(), dtype=torch.float32)
    assert not torch.equal(numpy_code, nf4_codebook())
    assert torch.allclose(numpy_code, nf4_codebook(), atol=2e-7)


def test_fp4_codebook_is_bitsandbytes_e2m1_table_in_code_order():
    code = fp4_codebook()
    assert same_bits(code, bnbF.get_4bit_type("fp4", device="cpu"))
    assert code[3] == 1.0 and code[11] == -1.0 and code[1] * 192 == pytest.approx(1.0)
    assert code.unique().numel() == 15  # codes 0 and 8 are both zero


def test_bitsandbytes_cannot_build_int4_so_ours_is_the_symmetric_linear_grid():
    with pytest.raises(RuntimeError):
        bnbF.get_4bit_type("int4", device="cpu")
    values = int4_codebook().unique()
    assert torch.equal(values, torch.arange(-7, 8, dtype=torch.float32) / 7)


def test_equal_bin_centroids_are_symmetric_without_zero_and_end_near_1_97_sigma():
    code = equal_bin_codebook()
    assert torch.allclose(code, -code.flip(0)) and not (code == 0).any()
    edges = norm.ppf(np.linspace(0, 1, 17))
    end_centroid = norm.pdf(edges[15]) * 16  # E[Z | Z > ppf(15/16)]
    assert end_centroid == pytest.approx(1.968, abs=1e-3)  # not the tutorial's 2.12
    assert code[-1] == 1.0 and code[-2].item() == pytest.approx(
        (norm.pdf(edges[14]) - norm.pdf(edges[15])) * 16 / end_centroid, rel=1e-6)


def test_paper_eq4_taken_literally_has_an_infinite_first_level():
    levels = paper_eq4_levels()
    assert levels.numel() == 16 and torch.isinf(levels[0]) and levels[0] < 0
    assert torch.isfinite(levels[1:]).all()


def test_thresholds_and_order_match_bitsandbytes_cpu_quantizer():
    for quant_type in ("nf4", "fp4"):
        bounds, order = thresholds(get_codebook(quant_type))
        ref_bounds, ref_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        assert same_bits(bounds, ref_bounds) and torch.equal(order, ref_order)
    bounds, _ = thresholds(nf4_codebook())
    assert bounds[6].item() == pytest.approx(-0.0455250181) and bounds[7].item() == pytest.approx(0.0397901498)


def test_dynamic_map_is_bitsandbytes_create_dynamic_map():
    code = create_dynamic_map()
    assert same_bits(code, bnbF.create_dynamic_map())
    assert code.unique().numel() == 256 and code[-1] == 1.0 and code[0].item() == pytest.approx(-0.99297, abs=1e-5)


def test_unknown_quant_type_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown quant_type 'nf5'; choose one of"):
        get_codebook("nf5")
