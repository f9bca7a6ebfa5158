"""Chapter 1 exercises: the notebook's solutions pass, classic mistakes fail, references equal PEFT/autograd."""

import random

import pytest
import torch

from companion.exercises import ch01
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(1)


def _llama_shapes(config, kv_out=None, intermediate=None):
    h = config["hidden_size"]
    i = config["intermediate_size"] if intermediate is None else intermediate
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"] if kv_out is None else kv_out
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def count_ignores_gqa(config, r, target_modules):  # k_proj/v_proj as wide as q_proj
    shapes = _llama_shapes(config, kv_out=config["hidden_size"])
    return config["num_hidden_layers"] * sum(r * sum(shapes[m]) for m in target_modules)


def count_one_factor(config, r, target_modules):  # the tutorial's 32 x 2 x 4096 x 8: lora_A only
    shapes = _llama_shapes(config)
    return config["num_hidden_layers"] * sum(r * shapes[m][0] for m in target_modules)


def count_square_mlp(config, r, target_modules):  # every matrix hidden x hidden
    shapes = _llama_shapes(config, intermediate=config["hidden_size"])
    return config["num_hidden_layers"] * sum(r * sum(shapes[m]) for m in target_modules)


def count_one_layer(config, r, target_modules):  # forgets the decoder layers
    shapes = _llama_shapes(config)
    return sum(r * sum(shapes[m]) for m in target_modules)


def forward_scaling_alpha(x, weight, lora_A, lora_B, lora_alpha, r):  # scaling = lora_alpha, no / r
    return SOL["lora_forward"](x, weight, lora_A, lora_B, lora_alpha * r, r)


def forward_rslora(x, weight, lora_A, lora_B, lora_alpha, r):  # alpha / sqrt(r): rsLoRA, not LoRA
    return SOL["lora_forward"](x, weight, lora_A, lora_B, lora_alpha * r ** 0.5, r)


def forward_no_base(x, weight, lora_A, lora_B, lora_alpha, r):  # the update alone
    return ((x.to(lora_A.dtype) @ lora_A.T @ lora_B.T) * (lora_alpha / r)).to(x.dtype)


def forward_float32_result(x, weight, lora_A, lora_B, lora_alpha, r):  # forgets to cast back
    return x.float() @ weight.float().T + (x.float() @ lora_A.T @ lora_B.T) * (lora_alpha / r)


def grads_no_scaling(x, weight, lora_A, lora_B, scaling, grad_output):
    return SOL["lora_grads"](x, weight, lora_A, lora_B, 1.0, grad_output)


def grads_inverse_scaling(x, weight, lora_A, lora_B, scaling, grad_output):  # scaling read as r / alpha
    return SOL["lora_grads"](x, weight, lora_A, lora_B, 1.0 / scaling, grad_output)


def grads_mean_over_tokens(x, weight, lora_A, lora_B, scaling, grad_output):
    grad_A, grad_B = SOL["lora_grads"](x, weight, lora_A, lora_B, scaling, grad_output)
    return grad_A / x.shape[0], grad_B / x.shape[0]


def grads_swapped(x, weight, lora_A, lora_B, scaling, grad_output):
    grad_A, grad_B = SOL["lora_grads"](x, weight, lora_A, lora_B, scaling, grad_output)
    return grad_B, grad_A


WRONG = {
    "ch01.lora_trainable_params": [count_ignores_gqa, count_one_factor, count_square_mlp, count_one_layer],
    "ch01.lora_forward": [forward_scaling_alpha, forward_rslora, forward_no_base, forward_float32_result],
    "ch01.lora_grads": [grads_no_scaling, grads_inverse_scaling, grads_mean_over_tokens, grads_swapped],
}


@pytest.mark.parametrize("name", ["lora_trainable_params", "lora_forward", "lora_grads"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch01.{name}", SOL[name])


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_calling_peft_or_autograd_for_the_graded_computation_is_reported():
    def forward_via_peft(x, weight, lora_A, lora_B, lora_alpha, r):
        from peft import LoraConfig

        LoraConfig(r=r, lora_alpha=lora_alpha)  # any call into PEFT
        return SOL["lora_forward"](x, weight, lora_A, lora_B, lora_alpha, r)

    def grads_via_autograd(x, weight, lora_A, lora_B, scaling, grad_output):
        A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
        y = x @ weight.T + (x @ A.T @ B.T) * scaling
        return torch.autograd.grad(y, (A, B), grad_output)

    def grads_via_backward(x, weight, lora_A, lora_B, scaling, grad_output):
        A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
        (x @ weight.T + (x @ A.T @ B.T) * scaling).backward(grad_output)
        return A.grad, B.grad

    def count_via_companion(config, r, target_modules):
        from companion.memory import footprint

        return footprint({"model_type": "llama", **config}, "lora", r=r, target_modules=target_modules).adapter_params

    assert_rejected("ch01.lora_forward", forward_via_peft, status="uses_reference")
    assert_rejected("ch01.lora_grads", grads_via_autograd, status="uses_reference")
    assert_rejected("ch01.lora_grads", grads_via_backward, status="uses_reference")
    assert_rejected("ch01.lora_trainable_params", count_via_companion, status="uses_reference")


def test_the_llama2_7b_count_is_the_chapters():
    assert ch01.reference_lora_trainable_params(ch01.LLAMA2_7B, 8, ["q_proj", "v_proj"]) == 32 * 2 * 8 * (4096 + 4096)


def test_the_count_reference_agrees_with_companion_memory_footprint():
    from companion.memory import footprint

    for case in ch01._count_cases(random.Random(3)):
        config, r, modules = case.args
        report = footprint({"model_type": "llama", "vocab_size": 32, **config}, "lora", r=r, target_modules=modules)
        assert report.adapter_params == case.expected, case.note


def test_the_forward_reference_is_lora_eq3():
    for case in ch01._forward_cases(random.Random(4)):
        x, weight, lora_A, lora_B, alpha, r = case.args
        y = (x.double() @ weight.double().T + (x.double() @ lora_A.double().T @ lora_B.double().T) * (alpha / r))
        torch.testing.assert_close(case.expected.double(), y, rtol=2e-2, atol=2e-2)
        assert case.expected.dtype == x.dtype


def test_the_grads_reference_equals_a_peft_lora_layer_backward():
    from peft import LoraConfig

    for case in ch01._grads_cases(random.Random(6)):
        x, weight, lora_A, lora_B, scaling, grad_output = case.args
        r = lora_A.shape[0]
        layer = ch01._peft_linear(weight, LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["proj"]))
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
        layer(x).backward(grad_output)
        grad_A, grad_B = case.expected
        torch.testing.assert_close(layer.lora_A["default"].weight.grad, grad_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, grad_B, rtol=1e-5, atol=1e-6)
        if "lora_B = 0" in case.note:
            assert torch.count_nonzero(grad_A) == 0 and torch.count_nonzero(grad_B) > 0


def test_no_grad_is_allowed_where_autograd_is_forbidden():
    def grads_under_no_grad(x, weight, lora_A, lora_B, scaling, grad_output):
        with torch.no_grad():
            return SOL["lora_grads"](x, weight, lora_A, lora_B, scaling, grad_output)

    assert_passes("ch01.lora_grads", grads_under_no_grad)
