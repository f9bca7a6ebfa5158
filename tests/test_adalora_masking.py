"""triplet_score / allocate_budget against PEFT's RankAllocator.mask_to_budget on random scores."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from companion.adalora import allocate_budget, mask_threshold, mask_to_budget, triplet_score

SHAPES = {"lin0": (7, 9), "lin1": (9, 11), "lin2": (11, 3)}  # (in, out)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, (d_in, d_out) in SHAPES.items():
            setattr(self, name, torch.nn.Linear(d_in, d_out))


def peft_toy(init_r=6):
    torch.manual_seed(0)
    config = AdaLoraConfig(init_r=init_r, target_r=2, target_modules=list(SHAPES), total_step=20)
    peft_model = get_peft_model(Toy(), config)
    return peft_model.base_model.model, peft_model.base_model.rankallocator


def set_random_scores(inner, allocator, gen, ties=False):
    """Random Ī and Ū in PEFT's allocator; returns our {layer: (s_P, s_Lambda, s_Q)} input."""
    for n, p in inner.named_parameters():
        if "lora_" in n:
            if ties:
                allocator.exp_avg_ipt[n] = torch.ones_like(p)
                allocator.exp_avg_unc[n] = torch.ones_like(p)
            else:
                allocator.exp_avg_ipt[n] = torch.rand(p.shape, generator=gen)
                allocator.exp_avg_unc[n] = torch.rand(p.shape, generator=gen)
    score = allocator._element_score
    return {name: (score(f"{name}.lora_B.default"), score(f"{name}.lora_E.default"), score(f"{name}.lora_A.default"))
            for name in SHAPES}


def peft_masks(rank_pattern):
    return {k.replace(".lora_E.default", ""): torch.tensor(v) for k, v in rank_pattern.items()}


@pytest.mark.parametrize("budget", [1, 5, 9, 17])
def test_kept_triplets_equal_peft_mask_to_budget(budget):
    inner, allocator = peft_toy()
    gen = torch.Generator().manual_seed(budget)
    for _ in range(3):
        layers = set_random_scores(inner, allocator, gen)
        ours = allocate_budget(layers, budget)
        reference = peft_masks(allocator.mask_to_budget(inner, budget))
        assert ours.keys() == reference.keys()
        for name in ours:
            assert torch.equal(ours[name], reference[name]), name
        assert sum(int(m.sum()) for m in ours.values()) == budget  # no ties in random data


def test_triplet_score_is_lambda_plus_row_mean_of_Q_plus_column_mean_of_P():
    gen = torch.Generator().manual_seed(0)
    s_P, s_E, s_Q = torch.rand(5, 3, generator=gen), torch.rand(3, 1, generator=gen), torch.rand(3, 4, generator=gen)
    expected = torch.stack([s_E[i, 0] + s_P[:, i].sum() / 5 + s_Q[i].sum() / 4 for i in range(3)])
    torch.testing.assert_close(triplet_score(s_P, s_E, s_Q), expected)
    assert torch.equal(triplet_score(s_P, s_E.view(-1), s_Q), triplet_score(s_P, s_E, s_Q))


def test_one_global_threshold_can_leave_a_matrix_with_rank_zero():
    scores = {"weak": torch.tensor([0.1, 0.2, 0.3]), "strong": torch.tensor([5.0, 6.0, 7.0])}
    masks = mask_to_budget(scores, 3)
    assert masks["weak"].tolist() == [False] * 3 and masks["strong"].tolist() == [True] * 3


def test_ties_at_the_threshold_mask_more_than_asked_exactly_as_peft():
    inner, allocator = peft_toy()
    layers = set_random_scores(inner, allocator, None, ties=True)
    ours = allocate_budget(layers, 10)
    reference = peft_masks(allocator.mask_to_budget(inner, 10))
    assert all(torch.equal(ours[n], reference[n]) for n in ours)
    assert sum(int(m.sum()) for m in ours.values()) == 0  # all 18 equal scores are <= the threshold


@pytest.mark.parametrize("budget", [0, -3, 18, 40])
def test_a_budget_outside_one_to_n_minus_one_is_refused(budget):
    scores = {"a": torch.rand(6), "b": torch.rand(12)}
    with pytest.raises(ValueError, match="budget must keep between 1 and 17 of the 18 triplets"):
        mask_threshold(scores, budget)


def test_score_shapes_that_disagree_on_the_rank_are_refused():
    with pytest.raises(ValueError, match="disagree on the rank"):
        triplet_score(torch.rand(5, 3), torch.rand(4), torch.rand(3, 4))
    with pytest.raises(TypeError, match="budget must be an int"):
        mask_threshold({"a": torch.rand(4)}, 2.0)
