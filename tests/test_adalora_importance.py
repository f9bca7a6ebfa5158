"""ImportanceTracker against PEFT's RankAllocator.update_ipt / _element_score on random tensors."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from companion.adalora import ImportanceTracker


def peft_toy(beta1=0.85, beta2=0.7):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    config = AdaLoraConfig(init_r=5, target_r=2, target_modules=["0", "2"], total_step=20, beta1=beta1, beta2=beta2)
    peft_model = get_peft_model(base, config)
    return peft_model.base_model.model, peft_model.base_model.rankallocator


def randomise(inner, gen):
    """New random adapter values and gradients, as after one optimizer step."""
    with torch.no_grad():
        for n, p in inner.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
                p.grad = torch.randn(p.shape, generator=gen)


def test_sensitivity_uncertainty_and_score_equal_peft_bit_for_bit_over_several_steps():
    inner, allocator = peft_toy()
    tracker = ImportanceTracker(beta1=0.85, beta2=0.7)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        randomise(inner, gen)
        allocator.update_ipt(inner)
        for n, p in inner.named_parameters():
            if "lora_" in n:
                tracker.update(n, p, p.grad)
    names = [n for n, _ in inner.named_parameters() if "lora_" in n]
    assert len(names) == 6  # A, B, E of two layers
    for n in names:
        assert torch.equal(tracker.ipt[n], allocator.ipt[n])
        assert torch.equal(tracker.sensitivity(n), allocator.exp_avg_ipt[n])
        assert torch.equal(tracker.uncertainty(n), allocator.exp_avg_unc[n])
        assert torch.equal(tracker.score(n), allocator._element_score(n))


def test_first_update_gives_the_ema_of_a_zero_start():
    tracker = ImportanceTracker(beta1=0.8, beta2=0.6)
    w, g = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.5, 3.0, -4.0])
    tracker.update("w", w, g)
    sensitivity = (w * g).abs()  # Eq. 10
    i_bar = 0.2 * sensitivity  # Eq. 11 from zero
    u_bar = 0.4 * (sensitivity - i_bar).abs()  # Eq. 12 from zero
    torch.testing.assert_close(tracker.sensitivity("w"), i_bar)
    torch.testing.assert_close(tracker.uncertainty("w"), u_bar)
    torch.testing.assert_close(tracker.score("w"), i_bar * u_bar)  # Eq. 13


def test_a_weight_with_a_large_but_steady_sensitivity_scores_below_a_fluctuating_one():
    """Eq. 13 multiplies by the uncertainty: steady sensitivities end with a vanishing score."""
    tracker = ImportanceTracker()
    w = torch.ones(2)
    for step in range(60):
        tracker.update("w", w, torch.tensor([1.0, 2.0 * (step % 2)]))  # steady 1 vs alternating 0, 2
    assert tracker.sensitivity("w")[0] > 0.9 and tracker.sensitivity("w")[1] > 0.9
    assert tracker.score("w")[0] < 1e-3 * tracker.score("w")[1]


def test_scoring_after_zero_grad_raises_and_says_where_to_call_it():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()  # set_to_none=True
    with pytest.raises(ValueError, match=r"before optimizer.zero_grad\(\)"):
        ImportanceTracker().update("weight", model.weight, model.weight.grad)
    with pytest.raises(ValueError, match="gradient shape"):
        ImportanceTracker().update("weight", model.weight, torch.ones(3))
    with pytest.raises(ValueError, match="call update"):
        ImportanceTracker().score("weight")


@pytest.mark.parametrize("beta", [0.0, 1.0, 1.2, -0.5])
def test_betas_outside_the_open_unit_interval_are_refused(beta):
    with pytest.raises(ValueError, match="beta1 must lie strictly between 0 and 1"):
        ImportanceTracker(beta1=beta)
    with pytest.raises(ValueError, match="beta2 must lie strictly between 0 and 1"):
        ImportanceTracker(beta2=beta)
