"""RankAllocator: PEFT's update_and_allocate loop, step for step, and its input checks."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from companion.adalora import RankAllocator, copy_adapter_weights_from_peft, inject_adalora, rank_grid


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


SCHEDULE = dict(target_r=2, tinit=5, tfinal=8, deltaT=3, total_step=40, beta1=0.8, beta2=0.9)


def test_forty_float64_steps_match_peft_parameters_masks_and_final_pattern():
    torch.manual_seed(0)
    base = MLP().double()
    ours = MLP().double()
    ours.load_state_dict(base.state_dict())
    peft_model = get_peft_model(base, AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["lin0", "lin1", "lin2"],
                                                    **SCHEDULE))
    inject_adalora(ours, ["lin0", "lin1", "lin2"], init_r=4, lora_alpha=8)
    copy_adapter_weights_from_peft(ours, peft_model)
    allocator = RankAllocator(ours, **SCHEDULE)
    # peft 0.21.2 re-creates ranknum as a *trainable* Parameter when it moves the adapter to the base layer's
    # dtype or device and either changes (here float64); train only A, B, E as the paper and we do.
    assert peft_model.base_model.model.lin0.ranknum["default"].requires_grad
    opt_p = torch.optim.AdamW([p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n],
                              lr=2e-2)
    opt_c = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(40):
        x, y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        for model, opt, allocate in ((peft_model, opt_p, peft_model.base_model.update_and_allocate),
                                     (ours, opt_c, allocator.update_and_allocate)):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            allocate(step)
            opt.zero_grad()
        reference = peft_model.peft_config["default"].rank_pattern
        if reference is not None:
            assert {k.replace(".lora_E.default", ""): v for k, v in reference.items()} == \
                {k: v.tolist() for k, v in allocator.rank_pattern.items()}, step
    peft_params = {n.replace("base_model.model.", "").replace(".default", ""): p
                   for n, p in peft_model.named_parameters() if "lora_" in n}
    for n, p in ours.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, peft_params[n], rtol=1e-10, atol=1e-12)
    assert [h["step"] for h in allocator.history] == [6, 9, 12, 15, 18, 21, 24, 27, 30, 32]
    assert allocator.history[-1]["kept"] == 2 * 3 and allocator.history[-1]["budget"] == 6


def test_after_step_converts_the_training_loops_1_based_steps():
    model = inject_adalora(MLP(), ["lin0", "lin1"], init_r=3)
    calls = []
    allocator = RankAllocator(model, target_r=1, tinit=0, tfinal=1, total_step=3)
    allocator.update_and_allocate = calls.append
    for step in (1, 2, 3):
        allocator.after_step(step, model)
    assert calls == [0, 1, 2]


def test_rank_grid_lays_ranks_out_like_the_papers_figure_3():
    ranks = {"bert.encoder.layer.0.attention.self.query": 3, "bert.encoder.layer.0.output.dense": 5,
             "bert.encoder.layer.1.attention.self.query": 1, "bert.encoder.layer.1.output.dense": 0}
    grid = rank_grid(ranks)
    assert list(grid.columns) == ["W_q", "W_f2"] and list(grid.index) == [0, 1]
    assert grid.loc[1, "W_q"] == 1 and grid.loc[0, "W_f2"] == 5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(target_r=4), ValueError, r"b\(T\) = 8 triplets exceeds the initial budget b\(0\) = 6: target_r must be "
                                   "below init_r"),
    (dict(target_r=3), ValueError, "target_r equals init_r .*PEFT 0.21.2 accepts .*use plain LoRA"),
    (dict(target_r=0), ValueError, "target_r must be a positive integer below init_r"),
    (dict(tinit=1.5), ValueError, "tinit and tfinal count steps and must be integers"),
    (dict(total_step=None), ValueError, "total_step is required"),
    (dict(tinit=5, tfinal=5, total_step=10), ValueError, "leaves no budgeting phase"),
    (dict(beta1=1.5), ValueError, "beta1 must lie strictly between 0 and 1"),
    (dict(beta2=0.0), ValueError, "beta2 must lie strictly between 0 and 1"),
])
def test_bad_allocator_settings_raise_errors_that_name_the_fix(kwargs, error, message):
    model = inject_adalora(MLP(), ["lin0", "lin1"], init_r=3)
    settings = dict(target_r=2, tinit=1, tfinal=1, total_step=10) | kwargs
    with pytest.raises(error, match=message):
        RankAllocator(model, **settings)


def test_scoring_after_zero_grad_is_the_classic_mistake_and_raises():
    model = inject_adalora(MLP(), ["lin0", "lin1"], init_r=3)
    allocator = RankAllocator(model, target_r=2, tinit=1, tfinal=1, total_step=10)
    model(torch.randn(4, 8)).sum().backward()
    model.zero_grad()
    with pytest.raises(ValueError, match=r"grad is None.*before optimizer.zero_grad\(\)"):
        allocator.update_and_allocate(0)
