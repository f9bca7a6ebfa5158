"""Chapter 6 exercises: the bookkeeping behind a fair comparison. AdaLoRA's final budget from its rank
pattern (counted by PEFT on the adapter it saves), the LoRA ranks the comparison harness accepts against
AdaLoRA's planned budget (``companion.bench``'s own budget check), and the mean ± standard deviation over
seeds of the chapter's results table (``companion.bench.BenchResults.summary``)."""

from __future__ import annotations

import math
import random
import warnings
from fractions import Fraction

import torch

from .core import Case, Exercise, compare_equal, describe, register

# MiniLM (all-MiniLM-L6-v2), the chapter's ci model: (d_in, d_out) of W_q, W_k, W_v, W_o, W_f1, W_f2 per layer
MINILM_LAYER = ((384, 384), (384, 384), (384, 384), (384, 384), (384, 1536), (1536, 384))
MATRICES = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


# ---------------------------------------------------------------------------------------------------------
# 6.1 AdaLoRA's final budget from its rank pattern

def _nested_linears(shapes: dict[str, tuple[int, int]]) -> torch.nn.Module:
    """A module tree with one bias-free ``Linear(d_in, d_out)`` at each dotted name of ``shapes``."""
    root = torch.nn.Module()
    for name, (d_in, d_out) in shapes.items():
        parent, path = root, name.split(".")
        for part in path[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path[-1], torch.nn.Linear(d_in, d_out, bias=False))
    return root


def reference_adalora_final_params(rank_pattern: dict[str, list[bool]], shapes: dict[str, tuple[int, int]]) -> int:
    """The adapter PEFT saves after allocation: ``get_peft_model_state_dict`` of an AdaLoRA model whose
    ``peft_config.rank_pattern`` is ``rank_pattern`` cuts lora_A, lora_E and lora_B to the kept triplets
    (``AdaLoraModel.resize_state_dict_by_rank_pattern``); the numel of what it returns is
    ``sum_k r_k (d_in,k + d_out,k + 1)``, ``companion.bench.kept_budget`` (the chapter's final budget)."""
    from peft import AdaLoraConfig, get_peft_model, get_peft_model_state_dict

    init_r = len(next(iter(rank_pattern.values())))
    model = get_peft_model(_nested_linears(shapes), AdaLoraConfig(
        init_r=init_r, target_r=max(1, init_r - 1), target_modules=list(shapes), total_step=10))
    model.peft_config["default"].rank_pattern = {f"{n}.lora_E.default": list(p) for n, p in rank_pattern.items()}
    with warnings.catch_warnings():  # PEFT warns about the zero-sized tensors of a matrix pruned to rank 0
        warnings.simplefilter("ignore")
        state = get_peft_model_state_dict(model)
    return sum(v.numel() for v in state.values())


def _top_k_pattern(rng: random.Random, n_matrices: int, init_r: int, kept: int) -> list[list[bool]]:
    """A pattern as ``RankAllocator.mask_to_budget`` makes it: the ``kept`` highest of all triplet scores."""
    scores = [[rng.random() * rng.choice((0.1, 1.0, 3.0)) for _ in range(init_r)] for _ in range(n_matrices)]
    threshold = sorted(s for row in scores for s in row)[n_matrices * init_r - kept - 1] if kept < n_matrices * init_r \
        else -1.0
    return [[s > threshold for s in row] for row in scores]


def _final_params_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the number of adapter parameters")  # noqa: E731

    def case(pattern, shapes, note):
        return Case((pattern, shapes), reference_adalora_final_params(pattern, shapes), compare, note=note)

    # the chapter's ci run: MiniLM, init_r = 6, a budget of target_r = 4 triplets per matrix on average
    layers = rng.sample(range(6), 2)
    shapes = {f"encoder.layer.{i}.{m}": s for i in sorted(layers) for m, s in zip(MATRICES, MINILM_LAYER)}
    rows = _top_k_pattern(rng, len(shapes), 6, 4 * len(shapes))
    yield case(dict(zip(shapes, rows)), shapes, "MiniLM, init_r=6, 4 triplets per matrix on average, moved "
                                                "between 384x384 and 384x1536 matrices")
    shapes = {"attention.query": (384, 384), "intermediate.dense": (384, 1536)}
    yield case({"attention.query": [True, False, True, True, False, True], "intermediate.dense": [False] * 6},
               shapes, "a matrix pruned to rank 0")
    shapes = {"q": (rng.randint(2, 40), rng.randint(2, 40))}
    init_r = rng.randint(2, 8)
    yield case({"q": [True] * init_r}, shapes, "one matrix that kept all init_r triplets")
    for _ in range(4):
        n = rng.randint(2, 6)
        init_r = rng.randint(2, 12)
        names = [f"layers.{k}.{rng.choice(('q_proj', 'v_proj', 'up_proj', 'down_proj'))}" for k in range(n)]
        shapes = {name: (rng.randint(1, 64), rng.randint(1, 64)) for name in names}
        rows = _top_k_pattern(rng, n, init_r, rng.randint(1, n * init_r - 1))
        yield case(dict(zip(names, rows)), shapes, "odd shapes, d_in != d_out, uneven ranks")


register(Exercise(
    id="ch06.adalora_final_params", chapter=6, title="AdaLoRA's final budget from its rank pattern", level="warm-up",
    signature="fn(rank_pattern: dict[str, list[bool]], shapes: dict[str, tuple[int, int]]) -> int  "
              "# rank_pattern: matrix name -> init_r flags (True: triplet kept); shapes: matrix name -> (d_in, d_out)",
    task="After allocation, AdaLoRA's rank_pattern says which of the init_r triplets (a column of P, a row of Q and "
         "one lambda) each adapted matrix kept. Count the adapter parameters that remain, the final budget the "
         "chapter's results table reports: the size of the adapter PEFT saves.",
    hint="matrix k keeps r_k = the number of True flags, and each kept triplet costs d_in + d_out + 1 parameters "
         "(a row of Q, a column of P, one lambda); sum over the matrices. It is not init_r or the average rank "
         "times every matrix: triplets of wide matrices cost more.",
    cases=_final_params_cases))


# ---------------------------------------------------------------------------------------------------------
# 6.2 The LoRA ranks the harness accepts against AdaLoRA

def reference_fair_lora_r(shapes: list[tuple[int, int]], init_r: int, target_r: int,
                          tolerance: float = 0.05) -> list[int]:
    """Every LoRA ``r`` for which ``companion.bench.check_budgets`` accepts the planned budgets
    ``trainable_budget("lora", shapes, r)`` and ``trainable_budget("adalora", shapes, target_r)``
    (``companion.bench.harness``; ``init_r`` does not enter the plan)."""
    from ..bench.harness import check_budgets, trainable_budget

    adalora = trainable_budget("adalora", shapes, target_r)
    per_rank = trainable_budget("lora", shapes, 1)
    accepted = []
    for r in range(1, math.ceil(adalora * (1 + tolerance) / per_rank) + 2):
        try:
            check_budgets({"lora": trainable_budget("lora", shapes, r), "adalora": adalora}, tolerance)
        except ValueError:
            continue
        accepted.append(r)
    return accepted


def _exact_tie(shapes, target_r, tolerance) -> bool:
    """Whether some r puts the gap exactly on the tolerance as written in decimal (0.05 = 1/20): formulas that
    are equal in exact arithmetic may then round to different sides in floating point."""
    s, n = sum(a + b for a, b in shapes), len(shapes)
    ada, tol = target_r * (s + n), Fraction(repr(tolerance))
    for r in range(1, 4 * target_r + 4):
        lo, hi = sorted((r * s, ada))
        if Fraction(hi - lo, lo) == tol:
            return True
    return False


def _tie_case(rng: random.Random) -> tuple[list[tuple[int, int]], int, int, float]:
    """Small matrices and a dyadic tolerance (exact in binary) with a LoRA budget exactly on the tolerance."""
    while True:
        tolerance = rng.choice((0.25, 0.5, 0.125))
        shapes = [(rng.randint(1, 6), rng.randint(1, 6)) for _ in range(rng.randint(1, 3))]
        target_r = rng.randint(1, 6)
        if _exact_tie(shapes, target_r, tolerance):
            return shapes, target_r + rng.randint(1, 3), target_r, tolerance


def _fair_r_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the list of accepted LoRA ranks")  # noqa: E731

    def case(shapes, init_r, target_r, tolerance, note, default_tolerance=False):
        expected = reference_fair_lora_r(shapes, init_r, target_r, tolerance)
        if default_tolerance:
            return Case((shapes, init_r, target_r), expected, compare, note=note)
        return Case((shapes, init_r, target_r), expected, compare, kwargs={"tolerance": tolerance}, note=note)

    layers = rng.randint(1, 6)
    yield case(list(MINILM_LAYER) * layers, 6, 4, 0.05, f"MiniLM, {layers} layers, the chapter's init_r=6, target_r=4",
               default_tolerance=True)
    deberta = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    yield case(deberta * rng.randint(1, 12), 12, 8, 0.05, "DeBERTaV3-base, init_r=12, target_r=8 (the gpu profile)")
    yield case([(1, 1)], 2, 1, 0.05, "1x1 matrices: no LoRA rank is within 5% of AdaLoRA's budget")
    yield case([(2, 3), (3, 2)], 6, 4, 0.05, "tiny matrices: LoRA r = target_r is refused, a larger r is accepted")
    yield case([(1, 1)], 2, 1, 0.5, "r=1 is exactly on the tolerance (accepted); r=3 is 100% above AdaLoRA's "
                                    "budget, i.e. 50% of the larger one (refused: the gap is relative to the smaller)")
    for _ in range(2):
        shapes, init_r, target_r, tolerance = _tie_case(rng)
        yield case(shapes, init_r, target_r, tolerance, "a LoRA budget exactly on the tolerance (accepted)")
    for _ in range(4):
        while True:
            shapes = [(rng.randint(1, 48), rng.randint(1, 48)) for _ in range(rng.randint(1, 5))]
            target_r = rng.randint(1, 10)
            tolerance = rng.choice((0.05, 0.1, 0.2, 0.3))
            if not _exact_tie(shapes, target_r, tolerance):  # an exact tie only with a dyadic tolerance
                break
        yield case(shapes, target_r + rng.randint(1, 6), target_r, tolerance, "small odd shapes")


register(Exercise(
    id="ch06.fair_lora_r", chapter=6, title="A fair LoRA rank against AdaLoRA", level="core",
    signature="fn(shapes: list[tuple[int, int]], init_r: int, target_r: int, tolerance: float = 0.05) -> list[int]  "
              "# shapes: (d_in, d_out) of each adapted matrix; returns the accepted LoRA ranks r >= 1, ascending",
    task="Before training anything, the comparison harness checks that LoRA and AdaLoRA get the same planned "
         "trainable budget, within a relative tolerance. Given the adapted matrices and AdaLoRA's init_r and "
         "target_r, return every LoRA rank r the harness's check accepts (an empty list if none).",
    hint="planned budgets: LoRA r * sum(d_in + d_out), AdaLoRA target_r * sum(d_in + d_out + 1) (init_r is only "
         "where AdaLoRA starts); the gap is (larger - smaller) / smaller and a pair is refused only when the gap "
         "is greater than the tolerance.",
    cases=_fair_r_cases))


# ---------------------------------------------------------------------------------------------------------
# 6.3 Mean ± standard deviation over seeds

SUMMARY_PARTS = ("val acc mean (%)", "val acc std", "steps to target", "reached target")


def reference_seed_summary(runs: list[dict]) -> dict[str, tuple[float, float, float, str]]:
    """``companion.bench.BenchResults.summary`` on a runs table with these rows: per method the mean and
    the sample standard deviation (pandas ``std``, ddof=1) of the validation accuracy in percent, the mean
    steps to target over the seeds that reached it (NaN if none did) and ``"reached/seeds"``."""
    import pandas as pd

    from ..bench.results import LABELS, RUN_COLUMNS, BenchResults

    frame = pd.DataFrame(runs)
    for column in RUN_COLUMNS:  # columns this exercise does not use
        if column not in frame:
            frame[column] = 0
    empty = pd.DataFrame()
    summary = BenchResults(frame, empty, empty, {}, {}).summary()
    method_of = {label: method for method, label in LABELS.items()}
    return {method_of.get(label, label): (float(row[SUMMARY_PARTS[0]]), float(row[SUMMARY_PARTS[1]]),
                                          float(row[SUMMARY_PARTS[2]]), str(row[SUMMARY_PARTS[3]]))
            for label, row in summary.iterrows()}


def _number_problem(got, expected, what) -> str | None:
    if hasattr(got, "item") and getattr(got, "ndim", 1) == 0:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"{what} must be a float, got {type(got).__name__} ({describe(got)})"
    if math.isnan(expected):
        return None if math.isnan(got) else f"{what} is {got!r}, expected nan (no seed reached the target)"
    if math.isnan(got) or not math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9):
        return f"{what} is {describe(float(got))}, expected {describe(expected)}"
    return None


def compare_summary(got, expected) -> str | None:
    """A dict method -> (mean %, std %, steps to target, "k/n"); numbers to 1e-9, NaN where expected."""
    if not isinstance(got, dict):
        return f"the result must be a dict method -> tuple, got {type(got).__name__} ({describe(got)})"
    if set(got) != set(expected):
        return f"the result has the methods {sorted(map(str, got))}, expected {sorted(expected)}"
    names = ("the mean validation accuracy (%)", "the standard deviation (points)", "the mean steps to target")
    for method, want in expected.items():
        row = got[method]
        if not isinstance(row, (tuple, list)) or len(row) != 4:
            return f"the entry of {method!r} must be a tuple of 4 (mean, std, steps, reached), got {describe(row)}"
        for g, e, what in zip(row, want, names):
            if problem := _number_problem(g, e, f"{what} of {method!r}"):
                return problem
        if problem := compare_equal(row[3], want[3], what=f"'reached target' of {method!r}"):
            return problem
    return None


def _runs(rng: random.Random, methods, seeds, *, never=(), always=(), same=()) -> list[dict]:
    rows = []
    for method in methods:
        base = rng.randint(100, 190)  # correct answers out of the 200 validation sentences
        for seed in seeds:
            correct = base if method in same else min(200, max(0, base + rng.randint(-12, 12)))
            reached = method in always or (method not in never and rng.random() < 0.6)
            steps = float(10 * rng.randint(1, 8)) if reached else math.nan
            rows.append({"method": method, "seed": seed, "val_accuracy": correct / 200, "steps_to_target": steps})
    return rows


def _summary_cases(rng: random.Random):
    methods = ("full", "lora", "adalora", "qlora", "qlora-adalora")
    rows = _runs(rng, methods, (0, 1, 2), never=("qlora",), always=("full",))
    yield Case((rows,), reference_seed_summary(rows), compare_summary,
               note="the chapter's five methods x seeds 0, 1, 2; no QLoRA seed reaches the target")
    rows = _runs(rng, ("lora", "adalora"), (0, 1, 2, 3), same=("lora",), always=("lora", "adalora"))
    yield Case((rows,), reference_seed_summary(rows), compare_summary, note="every seed equal: std 0")
    for _ in range(4):
        chosen = rng.sample(methods, rng.randint(1, 5))
        seeds = tuple(rng.sample(range(10), rng.randint(2, 5)))
        rows = _runs(rng, chosen, seeds)
        if rng.random() < 0.5:
            rng.shuffle(rows)
            note = f"{len(seeds)} seeds, rows in shuffled order"
        else:
            note = f"{len(seeds)} seeds"
        yield Case((rows,), reference_seed_summary(rows), compare_summary, note=note)


register(Exercise(
    id="ch06.seed_summary", chapter=6, title="Mean ± standard deviation over seeds", level="core",
    signature="fn(runs: list[dict]) -> dict[str, tuple[float, float, float, str]]  # runs: one dict per (method, "
              "seed) with 'method', 'seed', 'val_accuracy' (a fraction in [0, 1]) and 'steps_to_target' (float, nan "
              "if never reached); returns method -> (mean %, std in points, mean steps to target, 'reached/seeds')",
    task="Summarise the comparison's runs per method as the chapter's results table does: the mean and standard "
         "deviation over seeds of the validation accuracy in percent, the mean number of steps to the target "
         "accuracy, and how many seeds reached it, written 'k/n'.",
    hint="the standard deviation is the sample one (divide by n - 1, pandas' default); steps to target are "
         "averaged over the seeds that reached it only (nan when none did); multiply accuracies by 100.",
    cases=_summary_cases))
