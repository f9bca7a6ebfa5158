"""Double quantization and the 8-bit blockwise quantizer under it, against bitsandbytes 0.50.2 on a CPU."""

import pytest
import torch
from bitsandbytes import functional as bnbF

from companion.memory import bits_per_parameter as bits_from_shape
from companion.memory import bytes_4bit
from companion.quant import (NESTED_BLOCKSIZE, bits_per_parameter, create_dynamic_map, dequantize_4bit,
                             dequantize_blockwise, double_dequantize, quantize_4bit, quantize_blockwise)

DYN = create_dynamic_map()


def same_bits(a, b):
    as_int = {4: torch.int32, 1: torch.uint8}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(as_int[a.element_size()]), b.view(as_int[b.element_size()])))


def vectors():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(1000, generator=g)  # a partial last block
    yield torch.rand(4096, generator=g) * 3 - 1.5  # what absmax - offset looks like
    yield torch.randn(777, generator=g).pow(3)  # heavy tails
    v = torch.randn(1024, generator=g)
    v[256:512] = 0.0  # an all-zero block
    yield v
    yield torch.randn(300, generator=g) * 1e-20  # tiny scale
    yield torch.tensor([1.0])


def test_cpu_lut_codes_and_scales_match_bitsandbytes_quantize_blockwise():
    for v in vectors():
        ref_q, ref = bnbF.quantize_blockwise(v, blocksize=256)
        q, absmax = quantize_blockwise(v, DYN, 256)
        assert torch.equal(q, ref_q) and same_bits(absmax, ref.absmax)
        assert same_bits(dequantize_blockwise(q, absmax, DYN, 256), bnbF.dequantize_blockwise(ref_q, ref))


def test_every_entry_of_bitsandbytes_cpu_lookup_table_is_reproduced():
    """Each block is pinned to absmax 1, so the scaled values are the table's grid points (and midpoints)."""
    k = torch.arange(65536, dtype=torch.float32)
    for grid in (-1.0 + 2.0 * k / 65535, -1.0 + 2.0 * (k + 0.5) / 65535, -1.0 + 2.0 * (k + 0.499) / 65535):
        body = torch.nn.functional.pad(grid.clamp(-1, 1), (0, -grid.numel() % 255)).view(-1, 255)
        v = torch.cat([torch.ones(body.shape[0], 1), body], 1).reshape(-1)  # each block of 256 starts with 1.0
        ref_q, _ = bnbF.quantize_blockwise(v, blocksize=256)
        q, _ = quantize_blockwise(v, DYN, 256)
        assert torch.equal(q, ref_q)


def test_the_cpu_table_sometimes_differs_from_the_nearest_code_which_cuda_uses():
    v = torch.linspace(-1, 1, 65536)
    lut, _ = quantize_blockwise(v, DYN, 256, method="cpu-lut")
    nearest, _ = quantize_blockwise(v, DYN, 256, method="nearest")
    differ = (lut != nearest).sum().item()
    assert 0 < differ < 0.01 * v.numel()
    assert ((lut.long() - nearest.long()).abs() <= 1).all()  # off by one code at most


def test_nearest_method_is_the_nearest_dynamic_code_with_ties_going_low():
    g = torch.Generator().manual_seed(1)
    v = torch.cat([torch.ones(1), torch.rand(4095, generator=g) * 2 - 1])  # absmax 1: s = v
    q, _ = quantize_blockwise(v, DYN, 4096, method="nearest")
    brute = (v[:, None] - DYN[None, :]).abs().argmin(1)  # argmin takes the first (lower) index on ties
    assert torch.equal(q.long(), brute)


def test_double_quant_state_holds_mean_offset_uint8_codes_and_one_scale_per_256_blocks():
    w = torch.randn(512, 700)
    _, plain = quantize_4bit(w, 64, "nf4", double_quant=False)
    _, nested = quantize_4bit(w, 64, "nf4", double_quant=True)
    blocks = plain.absmax.numel()
    assert nested.absmax.dtype == torch.uint8 and nested.absmax.numel() == blocks
    assert same_bits(nested.offset, plain.absmax.mean()) and nested.offset.dim() == 0
    assert nested.state2.blocksize == NESTED_BLOCKSIZE and nested.state2.absmax.numel() == -(-blocks // 256)
    assert torch.equal(nested.state2.code, DYN)
    recovered = double_dequantize(nested)
    assert ((recovered - plain.absmax).abs() / plain.absmax).max() < 0.02  # research notes: 0.96% worst case
    _, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert same_bits(recovered, bnbF.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset)


def test_a_tiny_block_beside_huge_ones_loses_its_scale_in_bitsandbytes_too():
    """Double quantization's error is relative to the largest |absmax - offset| of 256 blocks."""
    w = torch.randn(256, 64) * 100
    w[3] = torch.randn(64) * 1e-3
    packed, state = quantize_4bit(w.reshape(-1), 64, "nf4", double_quant=True)
    ref_packed, ref = bnbF.quantize_4bit(w.reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4")
    recovered = double_dequantize(state)
    assert same_bits(recovered, bnbF.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset)
    assert recovered[3].abs() > 100 * w[3].abs().max()  # the small block's scale is lost to the big ones'
    assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(ref_packed, ref).view(-1))


@pytest.mark.parametrize("double_quant, expected", [(False, 4.5), (True, 4.12695)])
def test_bits_per_parameter_is_4_5_without_and_about_4_127_with_double_quantization(double_quant, expected):
    w = torch.randn(4096, 4096)
    packed, state = quantize_4bit(w, 64, "nf4", double_quant)
    assert bits_per_parameter(state) == pytest.approx(expected, abs=1e-5)
    assert packed.nbytes + state.state_bytes() == (8_654_852 if double_quant else 9_437_184)  # research notes §3.3
    _, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ref_bytes = ref.absmax.nbytes + (ref.state2.absmax.nbytes + ref.offset.nbytes if double_quant else 0)
    assert state.state_bytes() == ref_bytes


@pytest.mark.parametrize("shape", [(1000,), (300, 77), (64, 4096)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_bits_per_parameter_of_a_real_state_agrees_with_the_arithmetic_in_companion_memory(shape, blocksize):
    w = torch.randn(shape)
    for double_quant in (False, True):
        packed, state = quantize_4bit(w, blocksize, "nf4", double_quant)
        assert bits_per_parameter(state, packed) == bits_from_shape(w.numel(), blocksize=blocksize,
                                                                    double_quant=double_quant)
        assert packed.nbytes + state.state_bytes() == bytes_4bit(w.numel(), blocksize=blocksize,
                                                                 double_quant=double_quant)


def test_double_dequantize_refuses_a_broken_nested_state():
    _, state = quantize_4bit(torch.randn(1000), double_quant=True)
    state.state2.blocksize = 128
    with pytest.raises(ValueError, match="state2.blocksize must be 256"):
        double_dequantize(state)
    _, state = quantize_4bit(torch.randn(1000), double_quant=True)
    state.offset = None
    with pytest.raises(ValueError, match="needs its offset"):
        double_dequantize(state)
