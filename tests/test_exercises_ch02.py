"""Chapter 2 exercises: the notebook's solutions pass, classic mistakes fail, references equal PEFT."""

import random

import pytest
import torch

from companion.adalora import ImportanceTracker
from companion.adalora.schedule import budget_schedule as companion_budget
from companion.exercises import ch02
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(2)


def trainable_without_lambda(d_in, d_out, init_r):
    return sum(init_r * (i + o) for i, o in zip(d_in, d_out))


def trainable_counts_ranknum(d_in, d_out, init_r):
    return sum(init_r * (i + o + 1) + 1 for i, o in zip(d_in, d_out))


def trainable_square(d_in, d_out, init_r):  # as if every layer were d_in x d_in
    return sum(init_r * (2 * i + 1) for i in d_in)


def ema_swapped_betas(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):
    return SOL["importance_update"](param, grad, exp_avg_ipt, exp_avg_unc, beta2, beta1)


def ema_abs_grad(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):  # |grad| instead of |w * grad|
    ipt = grad.abs()
    new_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt
    return new_ipt, beta2 * exp_avg_unc + (1 - beta2) * (ipt - new_ipt).abs()


def ema_old_ibar_in_uncertainty(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):
    ipt = (param * grad).abs()
    new_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - exp_avg_ipt).abs()
    return beta1 * exp_avg_ipt + (1 - beta1) * ipt, new_unc


def ema_weights_swapped(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):  # beta on the new value
    ipt = (param * grad).abs()
    new_ipt = (1 - beta1) * exp_avg_ipt + beta1 * ipt
    return new_ipt, (1 - beta2) * exp_avg_unc + beta2 * (ipt - new_ipt).abs()


def ema_float32_result(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):
    i, u = SOL["importance_update"](param.float(), grad.float(), exp_avg_ipt.float(), exp_avg_unc.float(), beta1, beta2)
    return i, u


def schedule_linear(step, *, init_budget, target_budget, tinit, tfinal, total_step):
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * frac + target_budget)


def schedule_paper_typo(step, *, init_budget, target_budget, tinit, tfinal, total_step):
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    frac = 1 - (step - tinit - tfinal) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * frac ** 3 + target_budget)


def schedule_decay_to_total_step(step, *, init_budget, target_budget, tinit, tfinal, total_step):
    # the decay stretched to total_step, forgetting that the final phase takes tfinal of the steps
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    frac = 1 - (step - tinit) / (total_step - tinit)
    return int((init_budget - target_budget) * frac ** 3 + target_budget)


def schedule_rounds(step, *, init_budget, target_budget, tinit, tfinal, total_step):
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return round((init_budget - target_budget) * frac ** 3 + target_budget)


def schedule_tfinal_as_index(step, *, init_budget, target_budget, tinit, tfinal, total_step):  # peft#2341
    if step <= tinit:
        return init_budget
    if step > tfinal:
        return target_budget
    frac = 1 - (step - tinit) / max(1, tfinal - tinit)
    return int((init_budget - target_budget) * frac ** 3 + target_budget)


def triplet_sums_instead_of_means(score_E, score_A, score_B):
    return score_E.view(-1) + score_A.sum(dim=1) + score_B.sum(dim=0)


def triplet_axes_swapped(score_E, score_A, score_B):
    return score_E.view(-1) + score_A.mean(dim=0)[: score_E.numel()] + score_B.mean(dim=1)[: score_E.numel()]


def triplet_without_lambda(score_E, score_A, score_B):
    return score_A.mean(dim=1) + score_B.mean(dim=0)


def triplet_keeps_column_shape(score_E, score_A, score_B):
    return score_E + (score_A.mean(dim=1) + score_B.mean(dim=0))[:, None]


WRONG = {
    "ch02.adalora_trainable": [trainable_without_lambda, trainable_counts_ranknum, trainable_square],
    "ch02.importance_update": [ema_swapped_betas, ema_abs_grad, ema_old_ibar_in_uncertainty, ema_weights_swapped,
                               ema_float32_result],
    "ch02.budget_schedule": [schedule_linear, schedule_paper_typo, schedule_decay_to_total_step, schedule_rounds,
                             schedule_tfinal_as_index],
    "ch02.triplet_scores": [triplet_sums_instead_of_means, triplet_axes_swapped, triplet_without_lambda,
                            triplet_keeps_column_shape],
}


@pytest.mark.parametrize("name", ["adalora_trainable", "importance_update", "budget_schedule", "triplet_scores"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch02.{name}", SOL[name])


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_calling_peft_or_the_companion_for_the_graded_computation_is_reported():
    def via_companion(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):
        tracker = ImportanceTracker(beta1, beta2)
        tracker.exp_avg_ipt["w"], tracker.exp_avg_unc["w"] = exp_avg_ipt, exp_avg_unc
        tracker.update("w", param, grad)
        return tracker.sensitivity("w"), tracker.uncertainty("w")

    def via_peft(step, **kw):
        return ch02.reference_budget(step, **kw)

    assert_rejected("ch02.importance_update", via_companion, status="uses_reference")
    assert_rejected("ch02.budget_schedule", via_peft, status="uses_reference")


def test_the_importance_reference_equals_the_companion_tracker_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    param, grad = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    tracker = ImportanceTracker(0.8, 0.6)
    tracker.update("w", param, grad)
    ipt, unc = ch02.reference_importance_update(param, grad, torch.zeros(5, 3), torch.zeros(5, 3), 0.8, 0.6)
    assert torch.equal(ipt, tracker.sensitivity("w")) and torch.equal(unc, tracker.uncertainty("w"))


def test_the_budget_reference_equals_the_companion_schedule_on_every_step():
    kw = dict(init_budget=90, target_budget=24, tinit=7, tfinal=11, total_step=60)
    for step in range(61):
        assert ch02.reference_budget(step, **kw) == companion_budget(step, deltaT=1, **kw)[0]


def test_the_schedule_cases_cover_every_phase_boundary():
    cases = list(ch02._schedule_cases(random.Random(3)))
    notes = {c.note for c in cases}
    for note in ("step == tinit (still warm-up)", "first budgeting step", "first final step",
                 "step == total_step - tfinal (last budgeting step)"):
        assert note in notes


def test_the_trainable_reference_counts_a_real_peft_model():
    # Linear(7, 9) and Linear(9, 3) at r = 5: 5 * (7 + 9 + 1) + 5 * (9 + 3 + 1)
    assert ch02.reference_adalora_trainable([7, 9], [9, 3], 5) == 5 * 17 + 5 * 13
