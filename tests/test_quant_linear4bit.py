"""companion.quant.Linear4bit computes what bitsandbytes.nn.Linear4bit computes on a CPU, and LoRA trains on it;
it stands in for bitsandbytes' layer in PEFT's merge, in state_dict / load_state_dict and wherever code reads
its weight, and refuses what would treat its packed codes as a float matrix."""

import copy
import io
import warnings

import bitsandbytes as bnb
import pytest
import safetensors.torch
import torch
from bitsandbytes.backends.cpu.ops import _has_avx512
from bitsandbytes.functional import QuantState as BnbQuantState
from bitsandbytes.functional import has_avx512bf16
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from companion.measure import stored_bytes
from companion.quant import (Linear4bit, LoraLinear4bit, Params4bit, QuantState, dequantize_4bit, quantize_4bit,
                             register_lora_linear4bit, replace_linear)


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
                               compress_statistics=double_quant, quant_type=quant_type).to(dtype)
    theirs.load_state_dict(linear.state_dict())  # in dtype: its quant_state.dtype is the weight's, as ours
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


# ---- PEFT's LoRA merge: as into bitsandbytes' Linear4bit -------------------------------------------------------

def lora_twins(quant_type="nf4", double_quant=True, dtype=torch.float32, seed=0, **lora):
    """PEFT LoRA over ours (config registered) and over bitsandbytes' layer holding the same codes (a model
    marked is_loaded_in_4bit, as transformers marks it), with the same random adapter weights."""
    linear, theirs, ours = pair(quant_type, double_quant, dtype, in_features=64, out_features=32, seed=seed)
    theirs_model = nn.Sequential(theirs)
    theirs_model.is_loaded_in_4bit = True
    config = dict(r=4, lora_alpha=8, target_modules=["0"], **lora)
    ours_peft = get_peft_model(nn.Sequential(ours), register_lora_linear4bit(LoraConfig(**config)))
    theirs_peft = get_peft_model(theirs_model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed + 1)
    theirs_params = dict(theirs_peft.named_parameters())
    with torch.no_grad():
        for name, p in ours_peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                theirs_params[name].copy_(p)
    return ours_peft, theirs_peft


def assert_same_4bit_layer(ours: Linear4bit, theirs: "bnb.nn.Linear4bit"):
    """Same codes, same quant state (absmax, code, nested constants, offset, shape, dtype...) and same bias."""
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs)
    for key in sd_ours:
        assert sd_ours[key].dtype == sd_theirs[key].dtype and torch.equal(sd_ours[key], sd_theirs[key]), key


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype, use_dora", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-dora"])
def test_registered_lora_merges_into_the_4bit_layer_exactly_as_peft_merges_into_bitsandbytes(
        quant_type, double_quant, dtype, use_dora):
    ours_peft, theirs_peft = lora_twins(quant_type, double_quant, dtype, use_dora=use_dora)
    assert type(ours_peft.base_model.model[0]) is LoraLinear4bit
    x = torch.randn(3, 64).to(dtype)
    assert torch.equal(ours_peft(x), theirs_peft(x))  # PEFT's bitsandbytes LoRA forward on both
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours_merged, theirs_merged = ours_peft.merge_and_unload(), theirs_peft.merge_and_unload()
    rounding = [w for w in caught if "rounding errors" in str(w.message)]
    assert len(rounding) == 2  # PEFT's warning, once per merge
    assert type(ours_merged[0]) is Linear4bit and type(ours_merged[0].weight) is Params4bit
    assert_same_4bit_layer(ours_merged[0], theirs_merged[0])  # bf16 + fp32 delta: the state becomes fp32 in both
    assert torch.equal(ours_merged(x), theirs_merged(x))


def test_registered_lora_unmerge_requantizes_as_peft_does_for_bitsandbytes():
    ours_peft, theirs_peft = lora_twins()
    codes = ours_peft.base_model.model[0].base_layer.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (ours_peft, theirs_peft):
            model.merge_adapter()
        assert not torch.equal(ours_peft.base_model.model[0].base_layer.weight, codes)
        for model in (ours_peft, theirs_peft):
            model.unmerge_adapter()
    assert not ours_peft.base_model.model[0].merged
    assert_same_4bit_layer(ours_peft.base_model.model[0].base_layer, theirs_peft.base_model.model[0].base_layer)
    x = torch.randn(5, 64)
    assert torch.equal(ours_peft(x), theirs_peft(x))


def test_registered_merge_adds_the_lora_bias_scaled_as_the_forward_adds_it():
    ours_peft, _ = lora_twins(lora_bias=True)
    layer = ours_peft.base_model.model[0]
    expected = layer.base_layer.bias + layer.lora_B["default"].bias * layer.scaling["default"]
    assert layer.scaling["default"] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = ours_peft.merge_and_unload()
    assert torch.equal(merged[0].bias, expected.detach())


@pytest.mark.parametrize("safe_merge, match", [(True, "NaNs detected"), (False, "NaN or Inf")])
def test_merging_a_nan_adapter_is_refused_and_leaves_the_4bit_layer_unchanged(safe_merge, match):
    ours_peft, _ = lora_twins()
    layer = ours_peft.base_model.model[0]
    before = layer.base_layer.state_dict()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            ours_peft.merge_and_unload(safe_merge=safe_merge)
    after = layer.base_layer.state_dict()
    assert not layer.merged and all(torch.equal(before[k], after[k]) for k in before)


def test_plain_lora_config_trains_on_the_4bit_layer_but_refuses_to_merge_into_its_packed_codes():
    """The case program: get_peft_model with a plain LoraConfig wraps the layer with lora.Linear, whose merge would
    add Delta W to the packed codes (a shape error before); now a RuntimeError names the fix and changes nothing."""
    torch.manual_seed(0)
    peft_model = get_peft_model(replace_linear(nn.Sequential(nn.Linear(64, 32))), LoraConfig(r=2, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    codes, x = layer.base_layer.weight.detach().clone(), torch.randn(4, 64)
    y = peft_model(x)
    assert layer.get_delta_weight("default").shape == (32, 64)
    # PEFT's reader of quantized weights (DoRA, OLoRA) sees the (out, in) matrix, as for bitsandbytes' Params4bit
    assert torch.equal(dequantize_module_weight(layer.base_layer), layer.base_layer.dequantized_weight())
    for safe_merge in (False, True):
        with pytest.raises(RuntimeError, match=r"packed 4-bit codes .*register_lora_linear4bit"):
            peft_model.merge_and_unload(safe_merge=safe_merge)
    assert not layer.merged and torch.equal(layer.base_layer.weight, codes) and torch.equal(peft_model(x), y)


def test_peft_adalora_on_the_4bit_layer_refuses_to_merge_into_its_packed_codes():
    torch.manual_seed(0)
    model = replace_linear(nn.Sequential(nn.Linear(64, 32)))
    peft_model = get_peft_model(model, AdaLoraConfig(init_r=4, target_modules=["0"], total_step=10))
    with pytest.raises(RuntimeError, match="packed 4-bit codes"):
        peft_model.merge_and_unload()
    with pytest.raises(TypeError, match="AdaLoRA"):
        register_lora_linear4bit(AdaLoraConfig(init_r=4, target_modules=["0"], total_step=10))


# ---- the packed weight: what bitsandbytes' Params4bit carries, and no float arithmetic on the codes -----------

def test_the_weight_carries_its_quant_state_like_bitsandbytes_params4bit():
    _, theirs, ours = pair()
    w = ours.weight
    assert type(w).__name__ == "Params4bit" and w.quant_state is ours.quant_state and not w.requires_grad
    assert (w.quant_type, w.blocksize, w.compress_statistics) == (theirs.weight.quant_type, theirs.weight.blocksize,
                                                                  theirs.weight.compress_statistics)
    # what reads param.quant_state or the class name counts both layers alike
    assert stored_bytes(ours) == stored_bytes(theirs)
    ours_peft = get_peft_model(nn.Sequential(ours), LoraConfig(r=2, target_modules=["0"]))
    theirs_peft = get_peft_model(nn.Sequential(theirs), LoraConfig(r=2, target_modules=["0"]))
    lora = 2 * (128 + 64)  # r (in + out)
    counts = (lora, lora + 128 * 64 + 64)
    assert ours_peft.get_nb_trainable_parameters() == theirs_peft.get_nb_trainable_parameters() == counts


def test_the_packed_weight_refuses_what_would_treat_its_codes_as_a_float_matrix():
    _, _, ours = pair()
    w, codes = ours.weight, ours.weight.detach().clone()
    for misuse in (lambda: nn.functional.linear(torch.randn(2, 128), w), lambda: torch.randn(2, 128) @ w.T,
                   lambda: w.data.__iadd__(torch.ones(64, 128)), lambda: w.data.sub_(1), lambda: w.data.normal_(),
                   lambda: nn.init.kaiming_uniform_(w), lambda: setattr(w, "data", torch.zeros(64, 128)),
                   lambda: w.copy_(torch.zeros(w.shape)), lambda: w.data.__setitem__(0, 1.5)):
        with pytest.raises(RuntimeError, match=r"packed 4-bit codes \(uint8, shape \(4096, 1\)\), not the \(64, 128\)"):
            misuse()
    with pytest.raises(TypeError, match="cannot require gradients"):
        w.requires_grad = True
    with pytest.raises(TypeError, match="leave the 4-bit weights out when unfreezing"):
        ours.requires_grad_(True)
    with pytest.raises(TypeError, match="requantize"):
        ours.weight = nn.Parameter(torch.zeros(64, 128))
    with pytest.raises(TypeError, match="from_linear"):
        ours.reset_parameters()
    assert torch.equal(w, codes)
    # reading the codes stays possible: views, bit operations, copies (which keep the guard and the state)
    assert torch.equal((w >> 4).view(-1), (codes >> 4).view(-1)) and type(w.view(-1)) is torch.Tensor
    clone = w.clone()
    assert type(clone) is Params4bit and clone.quant_state is ours.quant_state and torch.equal(clone, codes)


def test_module_type_cast_is_refused_before_it_touches_the_codes():
    _, _, ours = pair()
    codes = ours.weight.detach().clone()
    with pytest.raises(TypeError, match=r"use \.to\(dtype\)"):
        ours.type(torch.float32)
    assert ours.weight.dtype == torch.uint8 and torch.equal(ours.weight, codes)
    assert ours.half().weight.dtype == torch.uint8 and ours.bias.dtype == torch.float16


def test_deepcopy_and_pickling_keep_codes_and_quant_state_independent():
    _, _, ours = pair()
    x = torch.randn(3, 128)
    twin = copy.deepcopy(ours)
    assert type(twin.weight) is Params4bit and twin.quant_state is not ours.quant_state
    assert twin.quant_state.absmax.data_ptr() != ours.quant_state.absmax.data_ptr()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for other in (twin, unpickled):
        assert type(other.weight) is Params4bit and torch.equal(other(x), ours(x))


def test_constructor_refuses_a_state_a_bias_or_a_layer_that_does_not_fit():
    packed, state = quantize_4bit(torch.randn(64, 128))
    other_packed, _ = quantize_4bit(torch.randn(32, 128))
    with pytest.raises(ValueError, match="belongs to another tensor"):
        Linear4bit(other_packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        Linear4bit(packed, state, bias=torch.zeros(128))
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(packed, state, compute_dtype=torch.int8)
    layer = Linear4bit(packed, state)
    with pytest.raises(TypeError, match="already quantized"):
        Linear4bit.from_linear(layer)
    with pytest.raises(ValueError, match=r"weight must have shape \(64, 128\)"):
        layer.requantize(torch.randn(128, 64))


# ---- state_dict / load_state_dict: the quant state travels, in bitsandbytes' format ----------------------------

@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_state_dict_is_byte_for_byte_what_bitsandbytes_linear4bit_saves(quant_type, double_quant):
    _, theirs, ours = pair(quant_type, double_quant, dtype=torch.bfloat16)
    assert_same_4bit_layer(ours, theirs)
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in ours.state_dict()


def two_layer_model(seed, dtype=torch.float32, **quant):
    torch.manual_seed(seed)
    return replace_linear(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48)).to(dtype), **quant)


def assert_same_quant_state(a: QuantState, b: QuantState):
    assert (tuple(a.shape), a.quant_type, a.blocksize, a.dtype, a.nested) == (tuple(b.shape), b.quant_type,
                                                                              b.blocksize, b.dtype, b.nested)
    assert torch.equal(a.absmax, b.absmax) and torch.equal(a.code, b.code)
    if a.nested:
        assert torch.equal(a.offset, b.offset) and a.offset.dtype == b.offset.dtype == torch.float32
        s2, t2 = a.state2, b.state2
        assert (s2.blocksize, s2.dtype) == (t2.blocksize, t2.dtype)
        assert torch.equal(s2.absmax, t2.absmax) and torch.equal(s2.code, t2.code)


@pytest.mark.parametrize("quant", [{}, dict(quant_type="fp4", blocksize=128, double_quant=False),
                                   dict(quant_type="int4", blocksize=32)], ids=["nf4-dq", "fp4-128", "int4-32"])
@pytest.mark.parametrize("via", ["state_dict", "torch.save", "safetensors"])
def test_state_dict_round_trips_exactly_into_a_fresh_model(quant, via):
    saved = two_layer_model(0, torch.bfloat16, **quant)
    state = saved.state_dict()
    if via == "torch.save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    elif via == "safetensors":
        state = safetensors.torch.load(safetensors.torch.save(state))
    fresh = two_layer_model(1, torch.bfloat16, **quant)
    assert not torch.equal(fresh[0].weight, saved[0].weight)
    fresh.load_state_dict(state)  # strict: the quant-state entries are neither missing nor unexpected
    for i in (0, 2):
        assert type(fresh[i].weight) is Params4bit and torch.equal(fresh[i].weight, saved[i].weight)
        assert torch.equal(fresh[i].bias, saved[i].bias)
        assert_same_quant_state(fresh[i].quant_state, saved[i].quant_state)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), saved(x))


def test_load_state_dict_with_assign_keeps_a_4bit_weight():
    saved, fresh = two_layer_model(0), two_layer_model(1)
    fresh.load_state_dict(saved.state_dict(), assign=True)
    assert type(fresh[0].weight) is Params4bit and torch.equal(fresh[0].weight, saved[0].weight)
    assert_same_quant_state(fresh[0].quant_state, saved[0].quant_state)


def test_the_4bit_layer_loads_a_bitsandbytes_checkpoint_and_bitsandbytes_reads_the_companion_entries():
    _, theirs, _ = pair(seed=0)
    _, _, ours = pair(seed=1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 128)
    theirs.train()
    assert torch.equal(ours(x), theirs(x))
    entries = {k.removeprefix("weight."): v for k, v in ours.state_dict().items() if k.startswith("weight.")}
    their_state = BnbQuantState.from_dict(entries, device=torch.device("cpu"))
    assert torch.equal(bnb.functional.dequantize_4bit(ours.weight.detach(), their_state), ours.dequantized_weight())


@pytest.mark.parametrize("checkpoint, match", [
    (lambda: two_layer_model(0, blocksize=128), r"0\.weight: the checkpoint was quantized with blocksize=128, "
                                                r"this layer with blocksize=64; build the model with the same"),
    (lambda: two_layer_model(0, quant_type="fp4"), r"0\.weight: .* quant_type='fp4', this layer with quant_type="),
    (lambda: two_layer_model(0, double_quant=False), r"0\.weight: .* double_quant=False, this layer with double"),
    (lambda: replace_linear(nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 48))),
     r"0\.weight: the checkpoint was quantized with shape=\(96, 32\), this layer with shape=\(96, 64\)"),
    (lambda: nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48)),
     r"0\.weight is a floating-point \(96, 64\) matrix, but this Linear4bit holds packed 4-bit codes .*replace_linear"),
], ids=["blocksize", "quant_type", "double_quant", "shape", "float-weight"])
def test_load_state_dict_refuses_a_mismatched_checkpoint_naming_the_key_and_the_fix(checkpoint, match):
    fresh = two_layer_model(1)
    codes = fresh[0].weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(checkpoint().state_dict())
    assert torch.equal(fresh[0].weight, codes)


def test_load_state_dict_refuses_codes_without_their_quant_state():
    state = {k: v for k, v in two_layer_model(0).state_dict().items() if not k.startswith("0.weight.")}
    with pytest.raises(ValueError, match=r"0\.weight holds codes but no quant state \(0\.weight\.absmax"):
        two_layer_model(1).load_state_dict(state)
    state = two_layer_model(0).state_dict()
    del state["0.weight.absmax"]
    with pytest.raises(ValueError, match=r"0\.weight: the checkpoint lacks the quant-state entries \['absmax'\]"):
        two_layer_model(1).load_state_dict(state)
