"""Error metrics and error tables of companion.quant.metrics."""

import pytest
import torch

from companion.quant import dequantize_4bit, error_table, quantization_error, quantize_4bit, roundtrip


def test_quantization_error_of_a_known_difference():
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    err = quantization_error(x, x + torch.tensor([0.5, -0.5, 0.0, 1.0]))
    assert err["mse"] == pytest.approx(1.5 / 4) and err["max_abs"] == 1.0 and err["mean_abs"] == 0.5
    assert err["rel_fro"] == pytest.approx((1.5 ** 0.5) / (14 ** 0.5))
    with pytest.raises(ValueError, match="shapes differ"):
        quantization_error(x, x[:3])


def test_roundtrip_is_dequantize_of_quantize():
    x = torch.randn(300, 70)
    assert torch.equal(roundtrip(x, "fp4", 128, True), dequantize_4bit(*quantize_4bit(x, 128, "fp4", True)))


def test_nf4_has_the_smallest_mse_of_the_bitsandbytes_types_on_gaussian_weights_at_blocksize_64():
    torch.manual_seed(0)
    table = error_table({"a": torch.randn(256, 512), "b": torch.randn(1000)}, blocksizes=(64, 4096),
                        metrics=("mse", "mean_abs", "max_abs"))
    assert list(table.columns) == ["blocksize", "quant_type", "mse", "mean_abs", "max_abs"] and len(table) == 8
    mse = table[table.blocksize == 64].set_index("quant_type")["mse"]
    assert mse["nf4"] < mse["int4"] < mse["fp4"]
    assert (table.groupby("quant_type").mse.apply(lambda s: s.iloc[0] < s.iloc[1])).all()  # smaller blocks help
    max_abs = table[table.blocksize == 64].set_index("quant_type")["max_abs"]
    assert max_abs["int4"] < max_abs["nf4"]  # Int4's even spacing bounds the worst case best


def test_error_table_pools_tensors_as_if_each_were_quantized_alone():
    torch.manual_seed(1)
    tensors = {"a": torch.randn(64, 128), "b": torch.randn(300, 64) * 3}
    table = error_table(tensors, quant_types=("nf4",), blocksizes=(64,), metrics=("mse", "max_abs"))
    errors = torch.cat([(roundtrip(x) - x).flatten() for x in tensors.values()]).double()
    assert table.mse.item() == pytest.approx(errors.pow(2).mean().item(), rel=1e-9)
    assert table.max_abs.item() == pytest.approx(errors.abs().max().item(), rel=1e-12)
