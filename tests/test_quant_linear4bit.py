"""companion.quant.Linear4bit computes what bitsandbytes.nn.Linear4bit computes on a CPU, and LoRA trains on it."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.backends.cpu.ops import _has_avx512
from bitsandbytes.functional import has_avx512bf16
from peft import LoraConfig, get_peft_model
from torch import nn

from companion.quant import Linear4bit, dequantize_4bit, quantize_4bit, replace_linear


@pytest.fixture(autouse=True)
def no_torch_compile():
    with torch._dynamo.config.patch(disable=True):
        yield


def pair(quant_type="nf4", double_quant=True, dtype=torch.float32, compute_dtype=None, in_features=128,
         out_features=64, seed=0):
    """A torch Linear, bitsandbytes' 4-bit copy of it (quantized on .to('cpu')) and ours."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features).to(dtype)
    theirs = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=compute_dtype,
                               compress_statistics=double_quant, quant_type=quant_type)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes here
    ours = Linear4bit.from_linear(linear, quant_type, 64, double_quant, compute_dtype)
    return linear, theirs, ours


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype, compute_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                  (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["fp32", "bf16", "fp32-in-bf16-compute", "fp16-in-fp32-compute"])
def test_output_equals_bitsandbytes_linear4bit(quant_type, double_quant, dtype, compute_dtype):
    _, theirs, ours = pair(quant_type, double_quant, dtype, compute_dtype)
    assert torch.equal(ours.weight, theirs.weight.data)  # the same packed bytes
    x = torch.randn(3, 5, 128).to(dtype)
    theirs.train()  # eval mode on AVX512-BF16 CPUs switches bitsandbytes to another kernel (see below)
    expected = theirs(x)
    got = ours(x)
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)


def test_input_gradient_equals_bitsandbytes_and_the_4bit_weight_gets_none():
    _, theirs, ours = pair()
    x1 = torch.randn(4, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    theirs(x1).square().sum().backward()
    ours(x2).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert ours.weight.grad is None and not ours.weight.requires_grad
    assert torch.allclose(ours.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-6)


def test_forward_is_a_plain_linear_with_the_dequantized_weight():
    linear, _, ours = pair(double_quant=False)
    x = torch.randn(7, 128)
    w = dequantize_4bit(ours.weight, ours.quant_state)
    assert torch.equal(ours(x), nn.functional.linear(x, w, linear.bias))
    assert (w - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()


def test_peft_lora_trains_on_top_and_never_touches_the_packed_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))
    replace_linear(model, skip_modules=("2",))  # keep the head in float
    assert isinstance(model[0], Linear4bit) and type(model[2]) is nn.Linear
    packed = model[0].weight.detach().clone()
    x, y = torch.randn(32, 64), torch.randint(0, 2, (32,))
    base_out = model(x)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], modules_to_save=["2"]))
    assert torch.equal(peft_model(x), base_out)  # B = 0 at initialisation
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(peft_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(peft_model.base_model.model[0].base_layer.weight, packed)


def test_moving_the_layer_keeps_its_state_and_casting_leaves_the_4bit_weight_alone():
    _, _, ours = pair()
    moved = ours.to("cpu").to(torch.bfloat16)
    assert moved.weight.dtype == torch.uint8 and moved.bias.dtype == torch.bfloat16
    assert moved.quant_state.absmax.dtype == torch.uint8 and moved.quant_state.state2.absmax.dtype == torch.float32
    assert moved(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "quant_type=nf4, blocksize=64, double_quant=True" in repr(moved)


def test_linear4bit_refuses_a_state_that_is_not_a_matrix():
    packed, state = quantize_4bit(torch.randn(128))
    with pytest.raises(ValueError, match=r"\(out_features, in_features\), got shape \(128,\)"):
        Linear4bit(packed, state)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes' fused bf16 CPU kernel needs AVX512-BF16")
def test_bitsandbytes_eval_mode_on_avx512_bf16_cpus_differs_by_bf16_rounding():
    _, theirs, ours = pair()
    x = torch.randn(4, 128)
    theirs.eval()
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert not torch.equal(expected, got)
    assert (expected - got).abs().max() < 2e-2 * got.abs().max()


@pytest.mark.skipif(not _has_avx512, reason="bitsandbytes' AVX512 dequantization kernel is not used here")
def test_bitsandbytes_linear4bit_on_avx512_is_wrong_when_in_features_is_not_a_multiple_of_blocksize():
    """in_features = 96: each row of the weight starts in the middle of a block (bitsandbytes 0.50.2)."""
    linear, theirs, ours = pair(in_features=96)
    x = torch.randn(4, 96)
    theirs.train()
    ref_w = dequantize_4bit(*quantize_4bit(linear.weight.detach(), 64, "nf4", True))
    assert torch.equal(ours(x), nn.functional.linear(x, ref_w, linear.bias))
    assert not torch.allclose(theirs(x), ours(x), atol=1e-3)
