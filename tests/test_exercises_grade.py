"""`python -m companion.exercises grade`: a folder with good, wrong, crashing, hanging and noisy submissions."""

import csv
import shutil
import subprocess
import sys

import nbformat
import pytest

from companion.exercises.grade import find_submissions
from companion.exercises.student import is_solution_cell, student_path
from exercise_helpers import ROOT, exercise_notebook

IDS = ["ch04.double_quant_bits", "ch04.lru_page_moves"]
TIMEOUT = 25  # seconds per submission; the hanging one costs this much


def _solution_source() -> str:
    nb = nbformat.read(exercise_notebook(4), as_version=4)
    return "\n\n".join(c.source for c in nb.cells if is_solution_cell(c)
                       if "double_quant_bits" in c.source or "lru_page_moves" in c.source)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    good = _solution_source()
    files = {
        "good.py": good,
        "wrong.py": good.replace("return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)", "return 4 + 32 / blocksize")
                        .replace("pool.popitem(last=False)", "pool.popitem(last=True)"),
        "half.py": good.split("from collections import OrderedDict")[0],  # only double_quant_bits
        "crash.py": "import os\nos._exit(3)\n",
        "hang.py": good.replace("    moves = 0\n", "    while True:\n        pass\n"),
        "noisy.py": good + "\nwhile True:\n    print('x' * 1000)\n",
        "exits.py": good.replace("from collections import OrderedDict", "import sys\nsys.exit(1)\n"),
        "cheat.py": "def double_quant_bits(blocksize, blocksize2=256):\n"
                    "    from companion.memory import bits_per_parameter\n"
                    "    return bits_per_parameter(10**9, blocksize=blocksize, double_quant=True)\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    shutil.copy(student_path(exercise_notebook(4)), folder / "stubs.ipynb")
    out = folder / "grades.csv"
    cmd = [sys.executable, "-m", "companion.exercises", "grade", str(folder), "--out", str(out),
           "--timeout", str(TIMEOUT), "--jobs", "2", "--seed", "0"] + [a for i in IDS for a in ("--exercise", i)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    return {(r["student"], r["exercise"]): r for r in rows}, proc


def status(graded, student):
    rows, _ = graded
    return [rows[(student, i)]["status"] for i in IDS]


def test_one_row_per_student_and_exercise(graded):
    rows, proc = graded
    students = {"good", "wrong", "half", "crash", "hang", "noisy", "exits", "cheat", "stubs"}
    assert {s for s, _ in rows} == students and len(rows) == len(students) * len(IDS)
    assert "graded 9 submissions x 2 exercises" in proc.stdout
    assert "grading" in proc.stderr  # the progress bar


def test_good_and_wrong_submissions(graded):
    assert status(graded, "good") == ["passed", "passed"]
    assert status(graded, "wrong") == ["failed", "failed"]
    rows, _ = graded
    assert "Hint:" in rows[("wrong", "ch04.lru_page_moves")]["message"]
    assert rows[("good", "ch04.lru_page_moves")]["passed"] == "True"


def test_a_missing_function_is_missing(graded):
    assert status(graded, "half") == ["passed", "missing"]


def test_crashing_hanging_and_printing_submissions_are_recorded_and_the_rest_graded(graded):
    rows, _ = graded
    assert status(graded, "crash") == ["crashed", "crashed"]
    assert "exit code 3" in rows[("crash", "ch04.double_quant_bits")]["message"]
    assert status(graded, "hang") == ["passed", "timeout"]  # done before the hang is kept
    assert f"time limit of {TIMEOUT} s" in rows[("hang", "ch04.lru_page_moves")]["message"]
    assert "while grading ch04.lru_page_moves" in rows[("hang", "ch04.lru_page_moves")]["message"]
    assert status(graded, "noisy") == ["timeout", "timeout"]  # it never stops printing at import
    assert status(graded, "exits") == ["passed", "missing"]  # sys.exit at import: what came before is graded
    assert "SystemExit" in rows[("exits", "ch04.lru_page_moves")]["message"]


def test_a_submission_that_calls_the_companion_is_reported(graded):
    rows, _ = graded
    assert rows[("cheat", "ch04.double_quant_bits")]["status"] == "uses_reference"


def test_the_student_notebook_unchanged_is_not_implemented(graded):
    assert status(graded, "stubs") == ["not_implemented", "not_implemented"]


def test_bad_folders_and_ids_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        find_submissions(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no .py or .ipynb files"):
        find_submissions(tmp_path)
    (tmp_path / "a.py").write_text("")
    proc = subprocess.run([sys.executable, "-m", "companion.exercises", "grade", str(tmp_path), "--out",
                           str(tmp_path / "g.csv"), "--exercise", "ch04.nope"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "the valid ids are" in proc.stderr
