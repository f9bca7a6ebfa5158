"""Run-level facts of AdaLoRA's allocation (schedule length, step counter, rank pattern, importance EMAs)
hold on every path: the train() loop, calls by hand, a run continued over several calls, a checkpoint."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from tiny_models import tiny_bert
from companion.adalora import RankAllocator, SeedMatrixScorer, inject_adalora
from companion.train import TrainConfig, train

TARGETS = ["query", "value"]
STEPS, ACCUM = 12, 2
SCHEDULE = dict(target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=STEPS)  # freezes at 0-based step 9


def batches(n=STEPS * ACCUM, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 60, (4, 8), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
            for _ in range(n)]


def build(init_r=4, targets=TARGETS, **schedule):
    model = inject_adalora(tiny_bert(), targets, init_r=init_r, trainable_modules=("classifier",))
    allocator = RankAllocator(model, **(SCHEDULE | schedule))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    return model, allocator, optimizer


def config(**kw):
    return TrainConfig(max_steps=STEPS, grad_accum=ACCUM, progress=False, **kw)


def lambdas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}


def assert_same_run(model_a, alloc_a, model_b, alloc_b):
    for (name, a), b in zip(lambdas(model_a).items(), lambdas(model_b).values()):
        assert torch.equal(a, b), name
    assert alloc_a.ranks() == alloc_b.ranks() and alloc_a.history == alloc_b.history
    assert all(torch.equal(alloc_a.rank_pattern[n], alloc_b.rank_pattern[n]) for n in alloc_a.rank_pattern)


@pytest.fixture(scope="module")
def straight():
    model, allocator, optimizer = build()
    train(model, batches(), optimizer, config(), after_step=allocator.after_step)
    assert allocator.step == STEPS and (allocator.history[-1]["step"], allocator.history[-1]["kept"]) == (9, 2 * 4)
    return model, allocator


# ------------------------------------------------------------------ the schedule against the loop
def test_train_refuses_allocator_whose_total_step_counts_micro_batches():
    model, allocator, optimizer = build(total_step=STEPS * ACCUM)
    before = lambdas(model)
    with pytest.raises(ValueError, match=r"total_step=24 does not match the training loop's max_steps=12 .*"
                                         r"grad_accum=2 .*counts micro-batches.*set total_step=12"):
        train(model, batches(), optimizer, config(), after_step=allocator.after_step)
    assert allocator.step == 0 and all(torch.equal(before[n], p) for n, p in lambdas(model).items())  # no step ran


@pytest.mark.parametrize("total_step, effect", [(20, "never frozen at b\\(T\\)"),
                                                (14, "final fine-tuning phase is cut"),
                                                (10, "steps 10 to 11 would run past the end")])
def test_train_refuses_a_schedule_that_does_not_end_where_the_loop_ends(total_step, effect):
    model, allocator, optimizer = build(total_step=total_step)
    with pytest.raises(ValueError, match=f"total_step={total_step} does not match.*{effect}.*Set total_step=12"):
        train(model, batches(), optimizer, config(), after_step=allocator.after_step)


def test_target_r_equal_to_init_r_is_refused_at_construction_where_peft_fails_steps_later():
    with pytest.raises(ValueError, match=r"target_r equals init_r .*b\(0\) = 16 triplets.*PEFT 0.21.2 accepts.*"
                                         r"kthvalue.*plain LoRA.*raise init_r"):
        build(init_r=4, target_r=4)
    # PEFT, same settings: accepted, then fails at the first allocation after tinit = 2
    same = AdaLoraConfig(init_r=4, target_modules=TARGETS, **(SCHEDULE | {"target_r": 4}))
    peft_model = get_peft_model(tiny_bert(), same)
    batch = batches(1)[0]
    with pytest.raises(RuntimeError, match="kthvalue"):
        for step in range(STEPS):
            peft_model(**batch).loss.backward()
            peft_model.base_model.update_and_allocate(step)
            peft_model.zero_grad()
    assert step == SCHEDULE["tinit"] + 1


# ------------------------------------------------------------------ the step counter
def test_update_and_allocate_refuses_a_skipped_a_repeated_and_a_late_step():
    model, allocator, _ = build(total_step=4, tinit=1, tfinal=1)
    batch = batches(1)[0]
    with pytest.raises(ValueError, match="got global_step=1 .* expects global_step=0: .*counting from 0"):
        allocator.update_and_allocate(1)  # 1-based counting
    for step in range(4):
        model(**batch).loss.backward()
        allocator.update_and_allocate(step)
        if step == 1:
            with pytest.raises(ValueError, match="got global_step=1 .* expects global_step=2"):
                allocator.update_and_allocate(1)  # repeated
        model.zero_grad()
    with pytest.raises(ValueError, match="global_step=4 is past the schedule's total_step=4"):
        allocator.update_and_allocate(4)
    assert allocator.step == 4


def test_a_second_train_call_continues_the_run_only_when_told_and_then_equals_the_straight_run(straight):
    model, allocator, optimizer = build()
    data = batches()
    train(model, data, optimizer, config(stop_after_step=5), after_step=allocator.after_step)
    with pytest.raises(ValueError, match=r"already done 5 of its total_step=12 steps.*"
                                         r"TrainConfig\(max_steps=12, resume_from_step=5\)"):
        train(model, data, optimizer, config(), after_step=allocator.after_step)
    log = train(model, data[5 * ACCUM:], optimizer, config(resume_from_step=5), after_step=allocator.after_step)
    assert log.frame()["step"].tolist() == list(range(6, 13))
    assert_same_run(model, allocator, *straight)


# ------------------------------------------------------------------ save, load, resume
@pytest.mark.parametrize("k", [2, 5, 9, 10])  # warm-up, budgeting, the step before the freeze, final phase
def test_resuming_from_a_saved_allocator_equals_the_straight_run_bit_for_bit(k, straight, tmp_path):
    model, allocator, optimizer = build()
    data = batches()
    train(model, data, optimizer, config(stop_after_step=k), after_step=allocator.after_step)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                "allocator": allocator.state_dict()}, tmp_path / "ckpt.pt")  # what a Trainer checkpoint holds
    saved = torch.load(tmp_path / "ckpt.pt")  # weights_only=True: plain tensors, numbers and strings
    fresh, fresh_allocator, fresh_optimizer = build()
    resume = config(resume_from_step=k)
    with pytest.raises(ValueError, match="resumes after step .* has done 0 steps: load_state_dict"):
        train(fresh, data[k * ACCUM:], fresh_optimizer, resume, after_step=fresh_allocator.after_step)
    fresh.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    fresh_allocator.load_state_dict(saved["allocator"])
    torch.set_rng_state(saved["rng"])  # the same dropout masks
    train(fresh, data[k * ACCUM:], fresh_optimizer, resume, after_step=fresh_allocator.after_step)
    assert_same_run(fresh, fresh_allocator, *straight)


def test_restarting_the_importance_emas_on_resume_gives_other_ranks(straight):
    """Why the EMAs are part of the state: drop them after step 3 and the resumed run masks differently."""
    model, allocator, optimizer = build()
    data = batches()
    train(model, data, optimizer, config(stop_after_step=3), after_step=allocator.after_step)
    allocator.scorer.reset()  # what a resumed PEFT run does: its RankAllocator starts with empty EMAs
    train(model, data[3 * ACCUM:], optimizer, config(resume_from_step=3), after_step=allocator.after_step)
    assert [h["kept"] for h in allocator.history] == [h["kept"] for h in straight[1].history]  # same budgets
    assert allocator.history != straight[1].history  # spent on other matrices
    assert any(not torch.equal(a, b) for a, b in zip(lambdas(model).values(), lambdas(straight[0]).values()))


@pytest.mark.parametrize("other, message", [
    (dict(total_step=14), r"written with total_step=12 but this RankAllocator has total_step=14"),
    (dict(target_r=1), r"written with target_budget=8 but this RankAllocator has target_budget=4"),
    (dict(beta1=0.5), r"beta1=0.85, beta2=0.85 but this tracker has beta1=0.5"),
    (dict(init_r=3), r"written with init_budget=16 .*init_budget=12"),
    (dict(targets=["query", "key"]), r"other adapters: only in the checkpoint \[.*value'\], only in this model "
                                     r"\[.*key'\]"),
])
def test_loading_state_into_another_schedule_or_other_layers_is_refused_and_changes_nothing(other, message):
    _, allocator, _ = build()
    allocator.step = 3
    state = allocator.state_dict()
    _, receiver, _ = build(**other)
    with pytest.raises(ValueError, match=message):
        receiver.load_state_dict(state)
    assert receiver.step == 0 and receiver.history == [] and receiver.rank_pattern is None


def test_a_scorer_without_state_dict_is_refused_when_saving():
    model = inject_adalora(tiny_bert(), TARGETS, init_r=4)
    allocator = RankAllocator(model, scorer=SeedMatrixScorer(), **SCHEDULE)
    with pytest.raises(TypeError, match="SeedMatrixScorer has no state_dict.*TripletImportance"):
        allocator.state_dict()
