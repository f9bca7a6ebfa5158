"""PiSSA initialisation from scratch, checked against PEFT's LoraConfig(init_lora_weights="pissa")."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_bert
from torch import nn

from companion.pissa import pissa_init, principal_energy


def peft_pissa(base, r, lora_alpha, targets, use_rslora=False):
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights="pissa",
                        use_rslora=use_rslora)
    return get_peft_model(base, config)


@pytest.mark.parametrize("r, lora_alpha, use_rslora", [(4, 8, False), (3, 16, True), (12, 12, False)])
def test_pissa_init_equals_peft_on_a_linear_layer(r, lora_alpha, use_rslora):
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(20, 12))
    weight = linear[0].weight.detach().clone()  # (out=12, in=20)
    layer = peft_pissa(linear, r, lora_alpha, ["0"], use_rslora).base_model.model[0]
    lora_A, lora_B, residual = pissa_init(weight, r, layer.scaling["default"])
    # the same float32 ops in the same order: bit for bit
    assert torch.equal(lora_A, layer.lora_A["default"].weight) and torch.equal(lora_B, layer.lora_B["default"].weight)
    assert torch.equal(residual, layer.base_layer.weight)
    assert lora_A.shape == (r, 20) and lora_B.shape == (12, r)
    # W_res + s B A = W (float32 rounding of the subtraction and add-back)
    assert torch.allclose(residual + layer.scaling["default"] * lora_B @ lora_A, weight, rtol=0, atol=1e-6)


def test_pissa_init_equals_peft_on_every_attention_layer_of_a_tiny_bert():
    base = tiny_bert()
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("query", "value"))}
    model = peft_pissa(copy.deepcopy(base), 4, 8, ["query", "value"])
    layers = {n: m for n, m in model.base_model.model.named_modules() if n in originals}
    assert layers.keys() == originals.keys()
    for name, layer in layers.items():
        lora_A, lora_B, residual = pissa_init(originals[name], 4, layer.scaling["default"])
        assert torch.equal(lora_A, layer.lora_A["default"].weight), name
        assert torch.equal(lora_B, layer.lora_B["default"].weight), name
        assert torch.equal(residual, layer.base_layer.weight), name
    # step 0: the PiSSA model computes the base model's function (residual + adapter = W)
    ids = torch.randint(0, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    base.eval(), model.eval()
    with torch.no_grad():
        expected, got = base(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_base_residual_equals_peft_and_peft_rounds_the_factors_to_the_base_dtype(dtype):
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(20, 12)).to(dtype)
    weight = linear[0].weight.detach().clone()
    layer = peft_pissa(linear, 4, 8, ["0"]).base_model.model[0]
    lora_A, lora_B, residual = pissa_init(weight, 4, layer.scaling["default"])
    assert residual.dtype == dtype and lora_A.dtype == lora_B.dtype == torch.float32
    assert torch.equal(residual, layer.base_layer.weight)  # the SVD of the float32 upcast, cast back
    # pissa_init's factors are float32; get_peft_model then moves the adapter to the base layer's dtype
    # and upcasts it again (autocast_adapter_dtype), so PEFT's factors are the 16-bit roundings of ours
    assert torch.equal(lora_A.to(dtype).float(), layer.lora_A["default"].weight)
    assert torch.equal(lora_B.to(dtype).float(), layer.lora_B["default"].weight)
    assert not torch.equal(lora_A, layer.lora_A["default"].weight)


def test_principal_energy_is_the_top_r_share_of_the_squared_frobenius_norm():
    torch.manual_seed(0)
    weight = torch.randn(12, 20)
    energies = [principal_energy(weight, r) for r in range(1, 13)]
    assert all(a < b for a, b in zip(energies, energies[1:])) and energies[-1] == pytest.approx(1.0)
    lora_A, lora_B, _ = pissa_init(weight, 3, 1.0)  # scaling 1: B A is the principal part itself
    assert energies[2] == pytest.approx(float((lora_B @ lora_A).norm() ** 2 / weight.norm() ** 2), rel=1e-5)


@pytest.mark.parametrize("weight, r, error, match", [
    (torch.randn(8, 6), 7, ValueError, r"r must be an integer in \[1, min\(out, in\)\] = \[1, 6\]"),
    (torch.randn(8, 6), 0, ValueError, "r must be an integer"),
    (torch.randn(2, 8, 6), 2, ValueError, "2-D"),
    (torch.randint(0, 9, (8, 6)), 2, TypeError, "float32, float16 or bfloat16"),
    (torch.randn(8, 6).double(), 2, TypeError, "float32, float16 or bfloat16"),
])
def test_bad_inputs_raise_with_what_to_do(weight, r, error, match):
    with pytest.raises(error, match=match):
        pissa_init(weight, r, 2.0)
    with pytest.raises(error, match=match):
        principal_energy(weight, r)


def test_negative_scaling_is_refused():
    with pytest.raises(ValueError, match="scaling must be > 0"):
        pissa_init(torch.randn(8, 6), 2, -1.0)
