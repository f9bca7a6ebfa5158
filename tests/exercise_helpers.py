"""Shared helpers of the exercise tests: the notebook's own solutions, and a check that a wrong one fails.

Each ``tests/test_exercises_chNN.py`` defines ``WRONG = {exercise_id: [fn, ...]}`` with at least three
classic mistakes per exercise; ``tests/test_exercises.py`` checks that every registered exercise has them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

from companion.exercises import check
from companion.exercises.student import is_solution_cell

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)  # fixed seeds in the tests; check() draws fresh ones everywhere else


def exercise_notebook(chapter: int) -> Path:
    return ROOT / "notebooks" / "exercises" / f"ch{chapter:02d}_exercises.ipynb"


def solutions(chapter: int) -> dict:
    """The namespace after running the solution cells of the chapter's exercise notebook, in order
    (only those cells: they define the functions and import what they need)."""
    nb = nbformat.read(exercise_notebook(chapter), as_version=4)
    namespace: dict = {"__name__": f"ch{chapter:02d}_solutions"}
    for cell in nb.cells:
        if is_solution_cell(cell):
            exec(compile(cell.source, f"<ch{chapter:02d} solution>", "exec"), namespace)
    return namespace


def assert_passes(exercise_id: str, fn) -> None:
    for seed in SEEDS:
        result = check(exercise_id, fn, seed=seed)
        assert result.passed, str(result)
        assert result.cases >= 1


def assert_rejected(exercise_id: str, fn, status: str = "failed") -> None:
    """``fn`` fails on every seed with ``status`` and a message that says where and gives the hint."""
    for seed in SEEDS:
        result = check(exercise_id, fn, seed=seed)
        assert not result.passed, f"{exercise_id}: the wrong solution {fn.__name__} passed with seed {seed}"
        assert result.status == status, str(result)
        if status == "failed":
            assert "case " in result.message and "expected" in result.message.lower(), result.message
            assert "could not be compared" not in result.message, result.message  # the grader's own failure
            assert "Hint:" in result.message and f"seed={seed}" in result.message, result.message
