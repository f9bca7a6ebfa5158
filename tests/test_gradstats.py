import pytest
import torch
from peft import LoraConfig, get_peft_model

from companion.gradstats import GradNormRecorder, fraction_below, is_lora_param


def tiny_lora_model(seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


def backward_once(model, seed=1):
    torch.manual_seed(seed)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()


def test_fraction_below_counts_strictly_smaller_values():
    v = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert fraction_below(v, [0.25, 0.75, 2.0]).tolist() == [0.25, 0.75, 1.0]
    with pytest.raises(ValueError, match="empty"):
        fraction_below(torch.tensor([]), [1.0])


def test_lora_A_gradients_are_exactly_zero_at_initialisation_because_B_is_zero():
    model = tiny_lora_model()
    rec = GradNormRecorder(model)
    backward_once(model)
    rec(1)
    norms = rec.norms().set_index("name")["norm"]
    a_norms = norms[norms.index.str.contains("lora_A")]
    b_norms = norms[norms.index.str.contains("lora_B")]
    assert len(a_norms) == 2 and (a_norms == 0).all()
    assert (b_norms > 0).all()


def test_recorded_norms_and_fractions_match_a_direct_computation():
    model = tiny_lora_model()
    with torch.no_grad():  # make B non-zero so every factor gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    rec = GradNormRecorder(model, thresholds=[1e-3, 1e-2, 1e-1])
    backward_once(model)
    rec(1)
    lora = {n: p.grad for n, p in model.named_parameters() if is_lora_param(n)}
    got = rec.norms().set_index("name")["norm"]
    for name, grad in lora.items():
        assert got[name] == pytest.approx(grad.norm().item(), rel=1e-6)
    flat = torch.cat([g.reshape(-1).abs() for g in lora.values()])
    expected = [(flat < t).double().mean().item() for t in (1e-3, 1e-2, 1e-1)]
    assert rec.element_fractions().loc[1].tolist() == pytest.approx(expected)


def test_always_below_uses_the_largest_gradient_seen_per_entry():
    model = tiny_lora_model()
    rec = GradNormRecorder(model, thresholds=[1e-12])
    backward_once(model)
    rec(1)  # lora_A entries are exactly zero here
    model.zero_grad()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    backward_once(model, seed=2)
    rec(2)  # now lora_A entries are non-zero
    assert rec.element_fractions().loc[1, 1e-12] > 0.5
    assert rec.always_below().loc[1e-12] < rec.element_fractions().loc[1, 1e-12]
    assert rec.module_fraction_below(1e-12).tolist() == [0.5, 0.0]


def test_recorder_refuses_a_model_without_lora_parameters():
    with pytest.raises(ValueError, match="get_peft_model"):
        GradNormRecorder(torch.nn.Linear(2, 2))
