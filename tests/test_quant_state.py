"""QuantState mirrors bitsandbytes' QuantState; a state that does not fit its packed tensor is refused."""

import pytest
import torch
from bitsandbytes import functional as bnbF

from companion.quant import QuantState, dequantize_4bit, quantize_4bit


def bnb_pair(shape=(64, 128), double_quant=True, quant_type="nf4", dtype=torch.bfloat16):
    A = torch.randn(shape).to(dtype)
    packed, qs = bnbF.quantize_4bit(A, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    return A, packed, qs


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_from_bnb_and_to_bnb_keep_every_field(double_quant, quant_type):
    _, packed, qs = bnb_pair(double_quant=double_quant, quant_type=quant_type)
    state = QuantState.from_bnb(qs)
    back = state.to_bnb()
    for field in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        assert getattr(state, field) == getattr(qs, field) == getattr(back, field)
    assert state.absmax is qs.absmax and back.code is qs.code  # no copies
    if double_quant:
        assert state.offset is qs.offset and state.state2.absmax is qs.state2.absmax
        assert state.state2.blocksize == back.state2.blocksize == 256 and back.state2.dtype == torch.float32
    assert back == qs  # bitsandbytes' own QuantState equality
    assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, back))


def test_bitsandbytes_dequantizes_companion_output_and_the_other_way_round():
    A, packed, qs = bnb_pair()
    ours_packed, ours = quantize_4bit(A, 64, "nf4", True)
    assert torch.equal(bnbF.dequantize_4bit(ours_packed, ours.to_bnb()), dequantize_4bit(packed, QuantState.from_bnb(qs)))


def test_state_to_device_copies_every_tensor():
    _, _, qs = bnb_pair()
    state = QuantState.from_bnb(qs).to("cpu")
    assert state.nested and state.state2.code.device.type == "cpu" and state.shape == qs.shape


def test_only_nf4_and_fp4_states_convert_to_bitsandbytes():
    _, state = quantize_4bit(torch.randn(256), quant_type="int4")
    with pytest.raises(ValueError, match="bitsandbytes only dequantizes quant_type 'nf4' and 'fp4'"):
        state.to_bnb()


def test_from_bnb_refuses_the_state_of_an_8bit_blockwise_quantization():
    _, qs8 = bnbF.quantize_blockwise(torch.randn(512))
    with pytest.raises(ValueError, match="8-bit blockwise quantization"):
        QuantState.from_bnb(qs8)


def mismatches():
    """(name, function that breaks a fresh (packed, state), expected message)."""
    def other_shape(p, s):
        s.shape = torch.Size((64, 64))
    def short_absmax(p, s):
        s.absmax = s.absmax[:-1]
    def short_state2(p, s):
        s.state2.absmax = torch.cat([s.state2.absmax, s.state2.absmax])
    def bad_blocksize(p, s):
        s.blocksize = 48
    def bad_quant_type(p, s):
        s.quant_type = "nf8"
    def bad_dtype(p, s):
        s.dtype = torch.int8
    def bad_code(p, s):
        s.code = s.code[:8]
    return [("shape", other_shape, r"packed holds 4096 bytes but state.shape \(64, 64\) needs 2048"),
            ("absmax", short_absmax, "state.absmax has 127 values but 8192 values in blocks of 64 need 128"),
            ("state2", short_state2, "state.state2.absmax has 2 values"),
            ("blocksize", bad_blocksize, "blocksize must be a power of two"),
            ("quant_type", bad_quant_type, "unknown quant_type 'nf8'"),
            ("dtype", bad_dtype, "state.dtype must be float32, float16 or bfloat16, got torch.int8"),
            ("code", bad_code, "state.code must hold the 16 codebook values")]


@pytest.mark.parametrize("name, breaker, message", mismatches(), ids=[m[0] for m in mismatches()])
def test_a_state_that_does_not_fit_the_packed_tensor_is_refused_by_name(name, breaker, message):
    packed, state = quantize_4bit(torch.randn(64, 128), 64, "nf4", double_quant=True)
    breaker(packed, state)
    with pytest.raises(ValueError, match=message):
        dequantize_4bit(packed, state)


def test_dequantize_wants_a_companion_state():
    _, packed, qs = bnb_pair()
    with pytest.raises(TypeError, match="QuantState.from_bnb converts"):
        dequantize_4bit(packed, qs)


def test_a_plain_state_with_uint8_absmax_is_refused():
    packed, state = quantize_4bit(torch.randn(256), double_quant=True)
    state.state2 = None
    with pytest.raises(ValueError, match="state.absmax must be float32 without double quantization"):
        dequantize_4bit(packed, state)
