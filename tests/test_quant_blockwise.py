"""companion.quant.quantize_4bit / dequantize_4bit are bit-exact with bitsandbytes 0.50.2 on a CPU.

"Bit-exact" means: the same packed bytes, the same float32 absmax (or, with double quantization,
the same uint8 codes, offset and second-level absmax) and a dequantized tensor with the same dtype,
shape and bits (compared as integers, so NaN counts too). One exception: bitsandbytes' C++ kernel
decodes FP4 code 8 as -0.0 while its code table (``get_4bit_type("fp4")``, ``QuantState.code``) and
its torch path say +0.0; we follow the table, so against that kernel the sign of zero is ignored.

bitsandbytes' own CPU ``dequantize_4bit`` has two quirks the tests work around and document:
its AVX512 kernel reads the wrong absmax when a row of the tensor does not start a new block, and
for a 1-D tensor of even length it returns shape (1, n). Where that kernel is not trusted the tests
compare with bitsandbytes' pure-torch dequantization (``backends/default/ops.py``), which is what
its CPU op falls back to for odd shapes and what its CUDA kernel computes.
"""

import math

import pytest
import torch
from bitsandbytes import functional as bnbF
from bitsandbytes.backends.cpu.ops import _has_avx512
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from companion.quant import BLOCKSIZES, dequantize_4bit, encode_reference, fast, get_codebook, quantize_4bit, thresholds
from companion.quant.blockwise import block_absmax, pack

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(1,), (7,), (64,), (153,), (2, 3), (7, 13), (33, 64), (10, 96), (100, 64), (3, 5, 7), (65, 257), (5000,)]


@pytest.fixture(autouse=True)
def no_torch_compile():
    """bitsandbytes compiles its torch fallback per shape; eager gives the same bits, faster here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def same_bits_up_to_zero_sign(a, b) -> bool:
    """bitsandbytes' C++ kernel decodes FP4 code 8 as -0.0, its own table (state.code) as +0.0."""
    return same_bits(a + 0.0, b + 0.0)  # -0.0 + 0.0 == +0.0; every other value keeps its bits


def bnb_torch_dequantize(packed, qs):
    """bitsandbytes' pure-torch dequantization (its CPU fallback; the CUDA kernel's semantics)."""
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = bnbF.get_4bit_type(qs.quant_type, device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed.view(-1), absmax, code, qs.blocksize, qs.shape, qs.dtype)


def bnb_cpu_kernel_is_right(shape, blocksize) -> bool:
    """False where bitsandbytes' AVX512 dequantization kernel indexes absmax per row (cpu_ops.cpp)."""
    n, rows = shape[-1], math.prod(shape[:-1])
    avx512_kernel = _has_avx512 and blocksize < 2048 and n % 16 == 0
    return not (avx512_kernel and rows > 1 and n % blocksize)


def sample(kind: str, shape, dtype, seed: int = 0) -> torch.Tensor:
    """Test inputs: Gaussian, heavy-tailed, with outliers, and blocks of wildly different scales."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "cauchy":  # Student t with 1 degree of freedom: no mean, no variance
        x = torch.randn(n, generator=g) / torch.randn(n, generator=g).abs().clamp(min=1e-3)
    elif kind == "student3":
        chi2 = torch.randn(3, n, generator=g).pow(2).sum(0)
        x = torch.randn(n, generator=g) / (chi2 / 3).sqrt()
    elif kind == "outliers":  # LLM.int8-style: a few values 100-1000x the rest
        x = torch.randn(n, generator=g) * 0.02
        hit = torch.rand(n, generator=g) < 0.005
        x[hit] = torch.randn(int(hit.sum()), generator=g).sign() * torch.empty(int(hit.sum())).uniform_(2, 20, generator=g)
    elif kind == "scales":  # per-value scales from 1e-30 to 1e30, exact zeros, sparse blocks
        exponent = torch.randint(-30, 31, (n,), generator=g).float()
        x = torch.randn(n, generator=g) * 10.0 ** exponent
        x[torch.rand(n, generator=g) < 0.2] = 0.0
    else:
        raise ValueError(kind)
    finfo = torch.finfo(dtype)
    return x.clamp(-finfo.max / 2, finfo.max / 2).to(dtype).view(shape)


def assert_matches_bitsandbytes(A, blocksize, quant_type, double_quant):
    ref_packed, ref = bnbF.quantize_4bit(A, blocksize=blocksize, compress_statistics=double_quant,
                                         quant_type=quant_type)
    packed, state = quantize_4bit(A, blocksize, quant_type, double_quant)
    where = f"{tuple(A.shape)} {A.dtype} blocksize={blocksize} {quant_type} double_quant={double_quant}"
    assert same_bits(packed, ref_packed), where
    assert same_bits(state.absmax, ref.absmax), where
    assert same_bits(state.code, ref.code) and state.blocksize == ref.blocksize, where
    assert state.shape == ref.shape and state.dtype == ref.dtype and state.quant_type == ref.quant_type, where
    assert state.nested == ref.nested, where
    if double_quant:
        assert same_bits(state.offset, ref.offset), where
        assert same_bits(state.state2.absmax, ref.state2.absmax) and same_bits(state.state2.code, ref.state2.code), where
        assert state.state2.blocksize == ref.state2.blocksize == 256, where
    out = dequantize_4bit(packed, state)
    assert same_bits(out, bnb_torch_dequantize(ref_packed, ref)), where
    if bnb_cpu_kernel_is_right(A.shape, blocksize):
        bnb_out = bnbF.dequantize_4bit(ref_packed, ref)
        assert same_bits_up_to_zero_sign(out, bnb_out.view(A.shape)), where
        assert same_bits_up_to_zero_sign(bnbF.dequantize_4bit(packed, state.to_bnb()).view(A.shape), out), where


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codes_state_and_dequantized_tensor_match_bitsandbytes_for_every_shape_and_blocksize(dtype, quant_type,
                                                                                             double_quant):
    for i, shape in enumerate(SHAPES):
        for blocksize in BLOCKSIZES[i % 3::3]:  # a third of the blocksizes per shape; each blocksize meets 4 shapes
            assert_matches_bitsandbytes(sample("normal", shape, dtype, seed=i), blocksize, quant_type, double_quant)


@pytest.mark.parametrize("kind", ["cauchy", "student3", "outliers", "scales"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heavy_tails_outliers_and_extreme_scales_match_bitsandbytes(kind, dtype):
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            for blocksize in (64, 4096) if double_quant else (32, 256):
                assert_matches_bitsandbytes(sample(kind, (96, 130), dtype, seed=3), blocksize, quant_type, double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_large_matrix_matches_bitsandbytes(dtype):
    assert_matches_bitsandbytes(sample("normal", (1024, 1024), dtype, seed=7), 64, "nf4", True)


def test_values_exactly_on_a_threshold_take_the_lower_code():
    for quant_type in ("nf4", "fp4"):
        bounds, order = thresholds(get_codebook(quant_type))
        A = torch.cat([torch.ones(1), bounds])  # absmax 1, so each scaled value is the threshold itself
        packed, _ = quantize_4bit(A, 64, quant_type)
        ref_packed, _ = bnbF.quantize_4bit(A, blocksize=64, quant_type=quant_type)
        assert torch.equal(packed, ref_packed)
        codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten()
        assert torch.equal(codes[1:], order[:15].to(torch.uint8))  # threshold i -> sorted position i, the lower


def test_even_index_goes_to_the_high_nibble_and_odd_counts_are_padded_with_the_code_of_zero():
    packed, _ = quantize_4bit(torch.tensor([-1.0, 1.0, 0.0, 0.5]), 64, "nf4")
    assert packed.flatten().tolist() == [0x0F, 0x7C]  # 0.5 < 0.50166 -> code 12
    for quant_type, pad in (("nf4", 7), ("fp4", 0)):
        packed, _ = quantize_4bit(torch.randn(153), 64, quant_type)
        assert packed.shape == (77, 1) and packed.dtype == torch.uint8 and packed[-1, 0] & 15 == pad


def test_tiny_positive_fp4_values_get_the_zero_code_with_the_sign_bit_as_in_bitsandbytes():
    A = torch.tensor([1.0, 0.001, 0.0, -0.001, 0.0026, 0.003])
    packed, _ = quantize_4bit(A, 64, "fp4")
    assert [hex(b) for b in packed.flatten().tolist()] == ["0x38", "0x0", "0x81"]


@pytest.mark.parametrize("chunk", [64, 4096, 1 << 18])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fast_kernels_equal_the_reference_path_near_every_threshold(monkeypatch, chunk, dtype):
    """Adversarial inputs for the table-driven encoder: values a few ulps around thresholds x absmax."""
    monkeypatch.setattr(fast, "CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    for quant_type in ("nf4", "fp4", "int4", "nf4-equal-bin"):
        code = get_codebook(quant_type)
        bounds, _ = thresholds(code)
        blocks, blocksize = 96, 64
        absmax = torch.empty(blocks).uniform_(1e-3, 1e3, generator=g).to(dtype).float()
        x = bounds[torch.randint(0, 15, (blocks, blocksize), generator=g)] * absmax[:, None]
        x = x + torch.randint(-3, 4, x.shape, generator=g) * x.abs() * 2 ** -23  # a few ulps either side
        x[:, 0] = absmax  # pin each block's maximum
        x[5] = 0.0  # an all-zero block
        x[6] *= 1e-33  # a block below the fast path's range
        A = x.to(dtype)
        flat = A.reshape(-1)
        packed, state = quantize_4bit(A, blocksize, quant_type)
        reference = pack(encode_reference(flat, block_absmax(flat, blocksize), blocksize, code), 7)
        assert torch.equal(packed, reference), quant_type
        decoded = dequantize_4bit(packed, state)
        values = code[torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()]
        assert same_bits(decoded, (values.view(blocks, -1) * state.absmax[:, None]).to(dtype).view(A.shape))


def test_nan_and_inf_are_refused_by_default_and_kept_as_bitsandbytes_does_on_request():
    A = torch.randn(200)
    for bad in (float("nan"), float("inf")):
        B = A.clone()
        B[70] = bad
        with pytest.raises(ValueError, match=r"NaN or Inf values \(in blocks \[1\] of 64\)"):
            quantize_4bit(B)
        packed, state = quantize_4bit(B, nonfinite="keep")
        ref_packed, ref = bnbF.quantize_4bit(B, blocksize=64, quant_type="nf4")
        assert same_bits(packed, ref_packed) and same_bits(state.absmax, ref.absmax)
        assert same_bits(dequantize_4bit(packed, state), bnb_torch_dequantize(ref_packed, ref))
        assert torch.isnan(dequantize_4bit(packed, state)[64:128]).sum() >= 63  # the block is lost


@pytest.mark.parametrize("bad, message", [
    (torch.ones(8, dtype=torch.int32), "float32, float16 or bfloat16 tensors, got torch.int32"),
    (torch.ones(8, dtype=torch.bool), "got torch.bool"),
    (torch.ones(8, dtype=torch.float64), "got torch.float64"),
    (torch.zeros(0, 4), r"cannot quantize an empty tensor \(shape \(0, 4\)\)"),
])
def test_bad_inputs_get_an_error_that_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        quantize_4bit(bad)


@pytest.mark.parametrize("blocksize", [100, 16, 8192, 0, True])
def test_blocksizes_other_than_powers_of_two_from_32_to_4096_are_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two in"):
        quantize_4bit(torch.randn(64), blocksize=blocksize)


def test_quantize_refuses_an_unknown_quant_type():
    with pytest.raises(ValueError, match="unknown quant_type 'nf3'"):
        quantize_4bit(torch.randn(64), quant_type="nf3")


@pytest.mark.skipif(not _has_avx512, reason="bitsandbytes' AVX512 dequantization kernel is not used here")
def test_bitsandbytes_avx512_cpu_dequantization_misreads_absmax_when_rows_straddle_blocks():
    """Documents a bitsandbytes 0.50.2 CPU bug: rows of 96 values with blocksize 64."""
    A = torch.randn(10, 96)
    packed, state = bnbF.quantize_4bit(A, blocksize=64, quant_type="nf4")
    right = bnb_torch_dequantize(packed, state)
    assert not torch.equal(bnbF.dequantize_4bit(packed, state), right)
    assert torch.equal(dequantize_4bit(*quantize_4bit(A)), right)


def test_bitsandbytes_returns_a_row_for_a_1d_tensor_we_keep_the_shape():
    packed, state = bnbF.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")
    assert bnbF.dequantize_4bit(packed, state).shape == (1, 64)
    assert dequantize_4bit(*quantize_4bit(torch.randn(64))).shape == (64,)
