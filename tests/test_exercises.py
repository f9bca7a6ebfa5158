"""The exercise framework: the registry, check() on bad input, the notebooks and their student versions."""

import importlib
import inspect
import re

import nbformat
import pytest
import torch

from companion.exercises import LEVELS, check, get_exercise, list_exercises
from companion.exercises.student import (BEGIN, END, exercise_notebooks, is_solution_cell, strip_solution,
                                         student_notebook, student_path, write_student_notebooks)
from exercise_helpers import ROOT, exercise_notebook, solutions

CHAPTERS = range(1, 8)
FIXED = {  # ids and parameters teachers write against (issue: "these ids and signatures are fixed")
    "ch02.importance_update": ["param", "grad", "exp_avg_ipt", "exp_avg_unc", "beta1", "beta2"],
    "ch02.budget_schedule": ["step", "init_budget", "target_budget", "tinit", "tfinal", "total_step"],
    "ch04.nf4_codebook": [],
    "ch04.quantize_nf4": ["A", "blocksize"],
    "ch04.double_quant_bits": ["blocksize", "blocksize2"],
}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_has_three_to_six_exercises_from_warm_up_to_harder(chapter):
    rows = list_exercises(chapter)
    assert 3 <= len(rows) <= 6, [r["id"] for r in rows]
    levels = {r["level"] for r in rows}
    assert levels <= set(LEVELS) and "warm-up" in levels and levels & {"core", "stretch"}
    for r in rows:
        assert r["id"].startswith(f"ch{chapter:02d}.") and r["chapter"] == chapter
        assert r["signature"].startswith("fn(") and "->" in r["signature"]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_exercise_has_at_least_three_wrong_solutions_that_its_tests_reject(chapter):
    module = importlib.import_module(f"test_exercises_ch{chapter:02d}")
    for row in list_exercises(chapter):
        assert len(module.WRONG.get(row["id"], [])) >= 3, f"{row['id']} needs three classic mistakes in WRONG"
    assert set(module.WRONG) <= {r["id"] for r in list_exercises(chapter)}


@pytest.mark.parametrize("exercise_id", sorted(FIXED))
def test_the_fixed_ids_keep_their_signatures(exercise_id):
    exercise = get_exercise(exercise_id)
    fn = solutions(exercise.chapter)[exercise.name]
    assert list(inspect.signature(fn).parameters) == FIXED[exercise_id]
    for name in FIXED[exercise_id]:
        assert name in exercise.signature


def test_an_unknown_id_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown exercise id 'ch04.quantise_nf4'.*ch04.quantize_nf4"):
        check("ch04.quantise_nf4", lambda A, blocksize: None)
    with pytest.raises(ValueError, match="chapter must be one of 1-7"):
        list_exercises(9)
    with pytest.raises(TypeError, match="fn must be the function you wrote"):
        check("ch04.nf4_codebook", "nf4_codebook")


def test_a_wrong_signature_is_reported_not_raised():
    result = check("ch04.quantize_nf4", lambda A: None, seed=0)
    assert result.status == "bad_signature" and not result.passed
    assert "fn(A: Tensor, blocksize: int)" in result.message and "<lambda>(A)" in result.message


@pytest.mark.parametrize("returned,words", [
    (lambda A, bs: (torch.zeros(A.numel(), dtype=torch.int64), torch.ones(-(-A.numel() // bs))), "dtype torch.int64"),
    (lambda A, bs: (torch.zeros(A.numel(), 1, dtype=torch.uint8), torch.ones(-(-A.numel() // bs))), "has shape"),
    (lambda A, bs: None, "must be a tuple of 2"),
    (lambda A, bs: ([0] * A.numel(), torch.ones(-(-A.numel() // bs))), "must be a torch.Tensor"),
])
def test_a_wrong_dtype_shape_or_type_is_reported_as_such(returned, words):
    result = check("ch04.quantize_nf4", returned, seed=1)
    assert result.status == "failed" and words in result.message, result.message
    assert "Hint:" in result.message and "seed=1" in result.message


def test_an_exception_or_sys_exit_in_the_function_is_reported_with_the_call():
    def raises(A, blocksize):
        raise ValueError("boom")

    def exits(blocksize, blocksize2=256):
        raise SystemExit(0)

    result = check("ch04.quantize_nf4", raises, seed=0)
    assert result.status == "error" and "ValueError: boom" in result.message and "fn(tensor(" in result.message
    assert check("ch04.double_quant_bits", exits, seed=0).status == "error"


def test_a_stub_is_not_implemented_and_verify_raises_not_implemented_error():
    def stub():
        raise NotImplementedError("nf4_codebook: write your solution here")

    result = check("ch04.nf4_codebook", stub)
    assert result.status == "not_implemented" and result.cases == 0
    with pytest.raises(NotImplementedError):
        result.verify()
    with pytest.raises(AssertionError, match="FAILED"):
        check("ch04.double_quant_bits", lambda blocksize, blocksize2=256: 4.5, seed=0).verify()


def test_cases_are_fresh_on_every_call_and_replayable_with_the_seed():
    a = check("ch04.lru_page_moves", lambda accesses, n_slots: -1)
    b = check("ch04.lru_page_moves", lambda accesses, n_slots: -1, seed=a.seed)
    assert a.seed is not None and a.message == b.message
    lru = solutions(4)["lru_page_moves"]
    calls = []
    for _ in range(3):
        seen = []
        assert check("ch04.lru_page_moves", lambda accesses, n_slots: seen.append(tuple(accesses)) or lru(accesses, n_slots)).passed
        calls.append(seen)
    assert len({tuple(c) for c in calls}) == 3  # the random sequences differ from call to call


# ---- the notebooks ---------------------------------------------------------------------------------------

def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_each_exercise_notebook_states_every_exercise_as_the_grader_does(chapter):
    path = exercise_notebook(chapter)
    nb = nbformat.read(path, as_version=4)
    first, md = nb.cells[0], _markdown(nb)
    assert first.cell_type == "markdown" and first.source.startswith(f"# Chapter {chapter} exercises")
    assert "`ci` profile" in first.source and "minute" in first.source
    assert f"colab.research.google.com/github/peft-in-practice/peft-in-practice/blob/main/notebooks/exercises/" \
           f"student/{path.name}" in first.source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'PROFILE = "ci"' in params[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for row in list_exercises(chapter):
        ex = get_exercise(row["id"])
        for text in (f"`{ex.id}`", ex.title, ex.level, ex.signature, ex.task, ex.hint):
            assert text in md, f"{path.name}: the markdown of {ex.id} differs from the grader's: {text[:60]}"
        assert re.search(rf"^def {ex.name}\(", code, re.MULTILINE), f"{path.name} defines no {ex.name}()"
        assert f'check("{ex.id}", {ex.name}).verify()' in code
    for cell in nb.cells:
        if is_solution_cell(cell):
            assert "hide-cell" in cell.metadata.get("tags", []), "solutions hide behind a toggle in the book"
    assert re.findall(r"Grader id: `([^`]+)`", md) == [r["id"] for r in list_exercises(chapter)], \
        "list_exercises() gives a chapter's exercises in the notebook's order"


def test_every_exercise_notebook_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    assert len(exercise_notebooks(ROOT)) == 7
    for path in exercise_notebooks(ROOT):
        assert f"notebooks/exercises/{path.stem}" in toc


def test_the_student_notebooks_are_generated_from_the_authored_ones():
    assert write_student_notebooks(ROOT, check_only=True) == [], \
        "a student notebook is out of date: run `python -m companion.exercises student` and commit"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_a_student_notebook_has_stubs_and_no_solution(chapter):
    authored = nbformat.read(exercise_notebook(chapter), as_version=4)
    student = nbformat.read(student_path(exercise_notebook(chapter)), as_version=4)
    assert len(student.cells) == len(authored.cells)
    for a, s in zip(authored.cells, student.cells):
        if not is_solution_cell(a):
            assert s.source == a.source
            continue
        assert BEGIN not in s.source and "raise NotImplementedError(" in s.source
        assert "hide-cell" not in s.metadata.get("tags", [])
        body = a.source.split(BEGIN)[1].split(END)[0]
        for line in body.splitlines():
            if line.strip() and not line.strip().startswith("#"):
                assert line not in s.source.splitlines(), f"solution line left in the student notebook: {line}"


def test_strip_solution_keeps_the_indentation_and_refuses_broken_markers():
    src = f"def f(x):\n    '''doc'''\n    {BEGIN}\n    return x + 1\n    {END}\n"
    assert strip_solution(src) == "def f(x):\n    '''doc'''\n    raise NotImplementedError(\"f: write your solution here\")"
    with pytest.raises(ValueError, match="never closed"):
        strip_solution(f"def f():\n    {BEGIN}\n    return 1\n")
    with pytest.raises(ValueError, match="without a"):
        strip_solution(f"def f():\n    return 1\n    {END}\n")
    with pytest.raises(ValueError, match="indented differently"):
        strip_solution(f"def f():\n    {BEGIN}\n    return 1\n{END}\n")


def test_a_student_notebook_raises_only_not_implemented_error():
    """Every student notebook, executed with errors allowed: each error is NotImplementedError. The seven run
    one after another in one kernel (a kernel and its imports per notebook would cost ~10 s each)."""
    from nbclient import NotebookClient

    paths = exercise_notebooks(ROOT)
    combined = nbformat.v4.new_notebook(metadata=nbformat.read(student_path(paths[0]), as_version=4).metadata)
    origin = []
    for path in paths:
        cells = [c for c in nbformat.read(student_path(path), as_version=4).cells if c.cell_type == "code"]
        combined.cells += cells
        origin += [path.name] * len(cells)
    NotebookClient(combined, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(paths[0].parent)}}).execute()
    errors = {name: [] for name in (p.name for p in paths)}
    for name, cell in zip(origin, combined.cells):
        errors[name] += [(o.ename, o.evalue) for o in cell.outputs if o.output_type == "error"]
    for name, found in errors.items():
        assert found, f"{name}: the student version ran without asking for any solution"
        assert {e for e, _ in found} == {"NotImplementedError"}, (name, found)


def test_the_teaching_page_lists_every_exercise_as_the_registry_does():
    from companion.exercises.__main__ import markdown_table

    table = (ROOT / "book" / "_exercise_table.md").read_text()
    assert table == markdown_table(list_exercises()), \
        "run `python -m companion.exercises list --markdown > book/_exercise_table.md`"
    assert "```{include} _exercise_table.md" in (ROOT / "book" / "teaching.md").read_text()
