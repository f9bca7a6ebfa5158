"""The source tutorial's variants do what the tutorial describes, and every ablation arm trains."""

import pytest
import torch

from tiny_models import tiny_bert
from companion.adalora import (VARIANTS, AblationSettings, RankAllocator, SeedLearningRatePhases,
                               SeedMatrixScorer, adalora_layers, inject_adalora, prepare_variant, seed_svd_init)
from companion.train import TrainConfig, train

TARGETS = ("query", "value", "intermediate.dense")


def batches(n=4):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 60, (6, 8), generator=g)
        out.append({"input_ids": ids, "labels": (ids[:, 0] > 30).long()})
    return out


def backward(model):
    model(**batches(1)[0]).loss.backward()


def test_seed_matrix_score_is_min_max_normalised_gradient_l1_smoothed_twice():
    model = inject_adalora(tiny_bert(), list(TARGETS), init_r=3)
    layers = adalora_layers(model)
    backward(model)
    l1 = torch.stack([sum(p.grad.abs().sum() for p in (m.lora_A, m.lora_B, m.lora_E)) for m in layers.values()])
    normalised = (l1 - l1.min()) / (l1.max() - l1.min() + 1e-8)
    scorer = SeedMatrixScorer(beta1=0.9, beta2=0.5)
    scorer.update(layers)
    expected = 0.5 * (0.1 * normalised)  # both EMAs start at zero
    scores = scorer.triplet_scores(layers)
    for i, name in enumerate(layers):
        torch.testing.assert_close(scores[name], expected[i].expand(3))  # one value per matrix


def test_a_matrix_level_score_can_only_keep_or_drop_whole_matrices():
    model = inject_adalora(tiny_bert(), list(TARGETS), init_r=3)
    allocator = RankAllocator(model, target_r=2, tinit=0, tfinal=1, total_step=4, scorer=SeedMatrixScorer())
    for step in range(3):
        backward(model)
        allocator.update_and_allocate(step)
        model.zero_grad()
    kept = [int(mask.sum()) for mask in allocator.rank_pattern.values()]
    assert set(kept) == {0, 3}  # some matrices keep all three triplets, the others none


def test_seed_svd_init_puts_the_truncated_svd_of_w_in_the_adapter_and_freezes_u_and_v():
    model = inject_adalora(tiny_bert(), list(TARGETS), init_r=3, lora_alpha=3)
    seed_svd_init(model)
    layer = adalora_layers(model)["bert.encoder.layer.0.attention.self.query"]
    U, S, Vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
    rank3 = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.delta_weight().detach(), rank3 * 3 / (3 + 1e-5), rtol=1e-5, atol=1e-6)
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad and layer.lora_E.requires_grad
    assert layer.effective_rank == 3  # unlike the paper's Lambda = 0, the model changes at step 0


def test_three_phase_learning_rates_give_x3_x1_x03_to_30_40_30_percent_of_tensors():
    model = inject_adalora(tiny_bert(), list(TARGETS), init_r=3)
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    phases = SeedLearningRatePhases(adapters, base_lr=1e-3)
    optimizer = torch.optim.AdamW(phases.param_groups(), lr=1e-3)
    phases.bind(optimizer)
    backward(model)
    phases.after_backward(1, model)
    lrs = sorted((g["lr"] for g in optimizer.param_groups), reverse=True)
    n = len(lrs)  # 18 tensors: int(0.3 n) = 5 at 3x, up to int(0.7 n) = 12 at 1x, 6 at 0.3x
    assert lrs == pytest.approx([3e-3] * int(0.3 * n) + [1e-3] * (int(0.7 * n) - int(0.3 * n))
                                + [3e-4] * (n - int(0.7 * n)))
    with pytest.raises(ValueError, match="param_groups"):
        phases.bind(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_ablation_arm_trains_through_the_shared_loop(variant):
    settings = AblationSettings(target_modules=TARGETS, init_r=4, target_r=2, total_step=4, tinit=1, tfinal=1,
                                deltaT=1, lr=1e-2)
    run = prepare_variant(variant, tiny_bert(), settings)
    log = train(run.model, batches(), run.optimizer, TrainConfig(max_steps=4, progress=False),
                after_backward=run.after_backward, after_step=run.after_step)
    assert len(log.steps) == 4 and all(torch.isfinite(torch.tensor(log.frame()["loss"].values)))
    if variant == "lora":
        assert run.allocator is None and hasattr(run.model, "peft_config")
    else:
        assert sum(run.allocator.ranks().values()) <= 2 * 6


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant 'adalora'"):
        prepare_variant("adalora", tiny_bert())
