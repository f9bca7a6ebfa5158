"""Chapter 6 exercises: the notebook's solutions pass, classic mistakes fail, references are right."""

import math
import random
import statistics

import pandas as pd
import pytest

from companion.exercises import ch06
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(6)


# --- 6.1 adalora_final_params ------------------------------------------------------------------------------

def final_without_lambda(rank_pattern, shapes):  # LoRA's count: forgets the singular value of each triplet
    return sum(sum(p) * (shapes[n][0] + shapes[n][1]) for n, p in rank_pattern.items())


def final_at_init_r(rank_pattern, shapes):  # the starting budget: every flag counted, pruned or not
    return sum(len(p) * (shapes[n][0] + shapes[n][1] + 1) for n, p in rank_pattern.items())


def final_mean_rank_everywhere(rank_pattern, shapes):  # the plan: the average rank on every matrix
    mean_rank = statistics.mean(sum(p) for p in rank_pattern.values())
    return round(mean_rank * sum(d_in + d_out + 1 for d_in, d_out in shapes.values()))


def final_counts_pruned(rank_pattern, shapes):  # True read as "pruned"
    return sum((len(p) - sum(p)) * (shapes[n][0] + shapes[n][1] + 1) for n, p in rank_pattern.items())


# --- 6.2 fair_lora_r -----------------------------------------------------------------------------------------

def _accepted(shapes, target_r, tolerance, *, lora_extra=0, ada_rank=None, gap=None):
    per_rank = sum(a + b + lora_extra for a, b in shapes)
    ada = (ada_rank or target_r) * sum(a + b + 1 for a, b in shapes)
    gap = gap or (lambda lo, hi: (hi - lo) / lo <= tolerance)
    return [r for r in range(1, 4 * ada // per_rank + 3) if gap(*sorted((r * per_rank, ada)))]


def fair_at_init_r(shapes, init_r, target_r, tolerance=0.05):  # AdaLoRA's plan counted at init_r
    return _accepted(shapes, target_r, tolerance, ada_rank=init_r)


def fair_lora_with_lambda(shapes, init_r, target_r, tolerance=0.05):  # LoRA also charged a lambda per rank
    return _accepted(shapes, target_r, tolerance, lora_extra=1)


def fair_gap_relative_to_larger(shapes, init_r, target_r, tolerance=0.05):
    return _accepted(shapes, target_r, tolerance, gap=lambda lo, hi: (hi - lo) / hi <= tolerance)


def fair_rejects_ties(shapes, init_r, target_r, tolerance=0.05):  # refuses a gap equal to the tolerance
    return _accepted(shapes, target_r, tolerance, gap=lambda lo, hi: (hi - lo) / lo < tolerance)


def fair_only_target_r(shapes, init_r, target_r, tolerance=0.05):  # "LoRA r = AdaLoRA target_r", unchecked
    return [target_r]


# --- 6.3 seed_summary ----------------------------------------------------------------------------------------

def _summary(runs, *, std=statistics.stdev, scale=100, steps=None):
    by_method = {}
    for row in runs:
        by_method.setdefault(row["method"], []).append(row)
    out = {}
    for method, rows in by_method.items():
        acc = [scale * row["val_accuracy"] for row in rows]
        all_steps = [row["steps_to_target"] for row in rows]
        reached = [s for s in all_steps if not math.isnan(s)]
        mean_steps = steps(all_steps) if steps else (statistics.mean(reached) if reached else math.nan)
        out[method] = (statistics.mean(acc), std(acc), mean_steps, f"{len(reached)}/{len(rows)}")
    return out


def summary_population_std(runs):  # divides by n, numpy's default
    return _summary(runs, std=statistics.pstdev)


def summary_fractions(runs):  # accuracies left as fractions, not percent
    return _summary(runs, scale=1)


def summary_nan_poisons_steps(runs):  # averages over every seed, so one miss makes the mean nan
    return _summary(runs, steps=lambda s: sum(s) / len(s))


def summary_miss_as_max_steps(runs):  # a seed that never reached the target counted as 80 steps
    return _summary(runs, steps=lambda s: statistics.mean(80.0 if math.isnan(v) else v for v in s))


WRONG = {
    "ch06.adalora_final_params": [final_without_lambda, final_at_init_r, final_mean_rank_everywhere,
                                  final_counts_pruned],
    "ch06.fair_lora_r": [fair_at_init_r, fair_lora_with_lambda, fair_gap_relative_to_larger, fair_rejects_ties,
                         fair_only_target_r],
    "ch06.seed_summary": [summary_population_std, summary_fractions, summary_nan_poisons_steps,
                          summary_miss_as_max_steps],
}


@pytest.mark.parametrize("name", ["adalora_final_params", "fair_lora_r", "seed_summary"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch06.{name}", SOL[name])


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_calling_the_companion_for_the_graded_computation_is_reported():
    def final_via_kept_budget(rank_pattern, shapes):
        from companion.bench import kept_budget

        return kept_budget(shapes, {n: sum(p) for n, p in rank_pattern.items()})

    def fair_via_trainable_budget(shapes, init_r, target_r, tolerance=0.05):
        from companion.bench import trainable_budget

        trainable_budget("lora", shapes, 1)
        return [target_r]

    def summary_via_bench_results(runs):
        return ch06.reference_seed_summary(runs)

    assert_rejected("ch06.adalora_final_params", final_via_kept_budget, status="uses_reference")
    assert_rejected("ch06.fair_lora_r", fair_via_trainable_budget, status="uses_reference")
    assert_rejected("ch06.seed_summary", summary_via_bench_results, status="uses_reference")


def test_the_final_params_reference_is_peft_and_the_companion():
    from companion.bench import kept_budget

    for case in ch06._final_params_cases(random.Random(3)):
        pattern, shapes = case.args
        assert case.expected == kept_budget(shapes, {n: sum(p) for n, p in pattern.items()}), case.note


def test_the_chapter_pairing_passes_and_rank_8_against_4_is_refused():
    from companion.bench import BenchConfig, check_budgets, trainable_budget

    shapes = list(ch06.MINILM_LAYER) * 6
    config = BenchConfig()
    accepted = ch06.reference_fair_lora_r(shapes, config.init_r, config.r, config.budget_tolerance)
    assert accepted == [config.r]  # the chapter's LoRA r = AdaLoRA target_r, and only that
    with pytest.raises(ValueError, match="unequal trainable budgets"):  # "LoRA at rank 8 against AdaLoRA at 4"
        check_budgets({"lora": trainable_budget("lora", shapes, 8), "adalora": trainable_budget("adalora", shapes, 4)},
                      0.05)


def test_fair_r_cases_have_ties_only_with_dyadic_tolerances():
    for seed in range(5):
        for case in ch06._fair_r_cases(random.Random(seed)):
            shapes, _, target_r = case.args
            tolerance = case.kwargs.get("tolerance", 0.05)
            if "exactly on the tolerance" in case.note:
                assert tolerance in (0.25, 0.5, 0.125) and ch06._exact_tie(shapes, target_r, tolerance)
            else:
                assert not ch06._exact_tie(shapes, target_r, tolerance), case.note


def test_the_summary_reference_is_pandas_with_ddof_1():
    runs = ch06._runs(random.Random(0), ("lora", "adalora"), (0, 1, 2))
    frame = pd.DataFrame(runs)
    expected = ch06.reference_seed_summary(runs)
    for method, group in frame.groupby("method"):
        mean, std, steps, reached = expected[method]
        assert math.isclose(mean, 100 * group["val_accuracy"].mean())
        assert math.isclose(std, 100 * group["val_accuracy"].std(ddof=1))
        hit = group["steps_to_target"].dropna()
        assert (math.isnan(steps) and hit.empty) or math.isclose(steps, hit.mean())
        assert reached == f"{len(hit)}/{len(group)}"
