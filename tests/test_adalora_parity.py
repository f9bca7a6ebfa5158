"""The companion's AdaLoRA and PEFT's, trained side by side from identical adapters on the same batches."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from companion.adalora import (RankAllocator, add_orthogonal_regularization, copy_adapter_weights_from_peft,
                               inject_adalora)
from companion.data import sentiment_dataloaders
from companion.models import load_minilm_classifier

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # Wq Wk Wv Wo Wf1 Wf2


def peft_pattern(peft_model):
    pattern = peft_model.peft_config["default"].rank_pattern
    return None if pattern is None else {k.replace(".lora_E.default", ""): v for k, v in pattern.items()}


def ours_pattern(allocator):
    pattern = allocator.rank_pattern
    return None if pattern is None else {k: v.tolist() for k, v in pattern.items()}


def train_side_by_side(peft_model, ours, allocator, batches, lr):
    """PEFT's documented loop for both; returns per-step losses and rank patterns."""
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    opt_c = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    assert len(opt_p.param_groups[0]["params"]) == len(opt_c.param_groups[0]["params"])
    peft_model.train()
    ours.train()
    rows = []
    for step, batch in enumerate(batches):
        torch.manual_seed(step)  # same dropout masks in both models
        loss_p = peft_model(**batch).loss
        loss_p.backward()
        opt_p.step()
        peft_model.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        torch.manual_seed(step)
        loss_c = ours(**batch).loss
        loss_c.backward()
        opt_c.step()
        allocator.update_and_allocate(step)
        opt_c.zero_grad()
        rows.append((loss_p.item(), loss_c.item(), peft_pattern(peft_model), ours_pattern(allocator)))
    return rows


@pytest.fixture(scope="module")
def minilm_run():
    schedule = dict(target_r=4, tinit=4, tfinal=6, deltaT=2, total_step=24)
    peft_model, tokenizer = load_minilm_classifier(num_labels=2, seed=0)
    peft_model = get_peft_model(peft_model, AdaLoraConfig(task_type="SEQ_CLS", init_r=8, lora_alpha=16,
                                                          target_modules=TARGETS, orth_reg_weight=0.1, **schedule))
    ours, _ = load_minilm_classifier(num_labels=2, seed=0)
    inject_adalora(ours, TARGETS, init_r=8, lora_alpha=16, trainable_modules=("classifier",))
    copy_adapter_weights_from_peft(ours, peft_model)
    add_orthogonal_regularization(ours, 0.1)
    allocator = RankAllocator(ours, **schedule)
    loader = sentiment_dataloaders(tokenizer, batch_size=8, seed=0, max_length=32, n_train=192, n_validation=5,
                                   n_test=5)["train"]
    batches = list(loader)[:24]
    return train_side_by_side(peft_model, ours, allocator, batches, lr=5e-3), allocator, ours


def test_losses_agree_within_1e5_at_every_step(minilm_run):
    rows, _, _ = minilm_run
    diffs = [abs(p - c) for p, c, _, _ in rows]
    assert max(diffs) <= 1e-5, diffs
    assert rows[-1][0] < rows[0][0]  # and the run actually trains


def test_rank_patterns_are_identical_at_every_step(minilm_run):
    rows, allocator, _ = minilm_run
    for step, (_, _, reference, ours) in enumerate(rows):
        assert ours == reference, step
    # masks happened: in the budgeting phase (steps 6, 8, ..., 16) and at T - tfinal = 18
    assert [h["step"] for h in allocator.history] == [6, 8, 10, 12, 14, 16, 18]
    assert allocator.history[-1]["kept"] == 4 * 36
    assert len({h[k] for h in allocator.history for k in h if k.startswith("bert.")}) > 2  # ranks differ


def test_masked_singular_values_stay_zero_in_the_final_phase(minilm_run):
    _, allocator, ours = minilm_run
    for name, keep in allocator.rank_pattern.items():
        lam = ours.get_submodule(name).lora_E.detach().view(-1)
        assert torch.equal(lam[~keep], torch.zeros(int((~keep).sum())))
    assert allocator.ranks() == {n: int(k.sum()) for n, k in allocator.rank_pattern.items()}
