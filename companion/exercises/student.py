"""The student notebooks: each chapter's exercise notebook with every solution replaced by a stub.

The exercises are authored once, with solutions, in ``notebooks/exercises/chNN_exercises.ipynb``. In a
solution cell the code between the marker lines ``### BEGIN SOLUTION`` and ``### END SOLUTION`` is the
answer; :func:`student_notebook` replaces it with ``raise NotImplementedError(...)`` at the marker's
indentation (the Neuromatch and nbgrader convention) and drops the ``hide-cell`` tag the book uses to hide
solutions behind a toggle. Everything else (the task, the signature, the check cells) stays, so a student
runs the same ``check`` calls against the same graders.

    python -m companion.exercises student            # rewrite notebooks/exercises/student/*.ipynb
    python -m companion.exercises student --check    # exit 1 if a student notebook is out of date
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDE_TAGS = ("hide-cell", "hide-input", "remove-cell")
_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(", re.MULTILINE)


def strip_solution(source: str, where: str = "") -> str:
    """``source`` with each ``BEGIN``/``END SOLUTION`` region replaced by a ``NotImplementedError`` stub.

    Raises ``ValueError`` for a region that is not closed, nested, or whose markers are indented
    differently (the stub would land at the wrong depth).
    """
    lines, out, i = source.splitlines(), [], 0
    names = _DEF.findall(source)
    while i < len(lines):
        line = lines[i]
        if line.strip() == BEGIN:
            indent = line[: len(line) - len(line.lstrip())]
            j = i + 1
            while j < len(lines) and lines[j].strip() != END:
                if lines[j].strip() == BEGIN:
                    raise ValueError(f"{where}: nested '{BEGIN}' at line {j + 1}")
                j += 1
            if j == len(lines):
                raise ValueError(f"{where}: '{BEGIN}' at line {i + 1} is never closed by '{END}'")
            if not lines[j].startswith(indent) or lines[j][len(indent):].startswith((" ", "\t")):
                raise ValueError(f"{where}: '{END}' at line {j + 1} is indented differently from '{BEGIN}'")
            what = names[0] if names else "this exercise"
            out.append(f'{indent}raise NotImplementedError("{what}: write your solution here")')
            i = j + 1
            continue
        if line.strip() == END:
            raise ValueError(f"{where}: '{END}' at line {i + 1} without a '{BEGIN}' before it")
        out.append(line)
        i += 1
    return "\n".join(out)


def is_solution_cell(cell) -> bool:
    return cell.get("cell_type") == "code" and BEGIN in "".join(cell.get("source", ""))


def student_notebook(nb):
    """A copy of the notebook ``nb`` (an ``nbformat`` node) with every solution stubbed out."""
    out = copy.deepcopy(nb)
    for k, cell in enumerate(out.cells):
        if is_solution_cell(cell):
            cell.source = strip_solution(cell.source, where=f"cell {k}")
            tags = [t for t in cell.metadata.get("tags", []) if t not in HIDE_TAGS]
            if tags:
                cell.metadata["tags"] = tags
            else:
                cell.metadata.pop("tags", None)
    return out


def exercise_notebooks(root: Path) -> list[Path]:
    """The authored exercise notebooks under ``root/notebooks/exercises``."""
    return sorted((root / "notebooks" / "exercises").glob("ch*_exercises.ipynb"))


def student_path(path: Path) -> Path:
    return path.parent / "student" / path.name


def write_student_notebooks(root: Path, check_only: bool = False) -> list[Path]:
    """Generate every student notebook; with ``check_only`` write nothing and return the stale ones."""
    import nbformat

    stale = []
    for path in exercise_notebooks(root):
        text = nbformat.writes(student_notebook(nbformat.read(path, as_version=4))) + "\n"
        target = student_path(path)
        if not target.exists() or target.read_text() != text:
            stale.append(target)
            if not check_only:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    return stale
