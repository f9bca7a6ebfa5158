"""One submission, graded in its own process (started by :mod:`companion.exercises.grade`).

    python -m companion.exercises.worker SUBMISSION RESULTS.jsonl [--ids ID,ID] [--seed N]

Loads the submission (a ``.py`` file executed as a module that is not ``__main__``, or an ``.ipynb`` whose code
cells run one by one, IPython ``!``/``%`` lines and the notebooks' own ``check(...)`` cells skipped), then grades
every exercise whose function it defines. Each event is one JSON line appended to RESULTS.jsonl and flushed:
``loaded`` (the functions found, the errors met while loading), ``start`` (an exercise begins) and ``result``
(a :class:`~companion.exercises.core.CheckResult`). An exception or ``sys.exit`` in the student's code is
caught and reported; whatever it prints goes to this process's stdout, which the grader discards.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .core import check, get_exercise, list_exercises

MAGIC = ("!", "%")


def _cells(path: Path) -> list[tuple[str, str]]:
    """``(where, source)`` of each piece to run: the file, or each code cell (numbered as Jupyter shows the
    notebook, every cell counted from 1) without its ``!``/``%`` lines, leaving out the notebook's own
    ``check(...)`` cells."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        kept = []
        for k, cell in enumerate(nb.get("cells", []), start=1):
            if cell.get("cell_type") != "code":
                continue
            lines = [ln for ln in "".join(cell["source"]).splitlines() if not ln.lstrip().startswith(MAGIC)]
            code = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if code and all(ln.lstrip().startswith("check(") for ln in code):
                continue  # the notebook's own grading cells: the grader does that itself
            kept.append((f"cell {k}", "\n".join(lines)))
        return kept
    return [(path.name, path.read_text())]


def load(path: Path) -> tuple[dict, list[str]]:
    """The namespace the submission defines, and one line per error met while loading it (a cell that calls a
    stub still raising ``NotImplementedError`` is expected in a student notebook and not listed)."""
    namespace: dict = {"__name__": "submission", "__file__": str(path)}
    errors = []
    for where, source in _cells(path):
        try:
            exec(compile(source, f"<{path.name} {where}>", "exec"), namespace)
        except NotImplementedError:
            continue
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit too: keep what was defined before it
            errors.append(f"{where}: {type(err).__name__}: {str(err)[:200]}")
    return namespace, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submission", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--ids", default=None, help="comma-separated exercise ids (default: every one defined)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    out = open(args.results, "a", buffering=1)

    def emit(**event) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    namespace, errors = load(args.submission)
    ids = args.ids.split(",") if args.ids else [e["id"] for e in list_exercises()]
    defined = [get_exercise(i).name for i in ids if callable(namespace.get(get_exercise(i).name))]
    emit(event="loaded", defined=defined, load_errors=errors)
    for ex_id in ids:
        fn = namespace.get(get_exercise(ex_id).name)
        if not callable(fn):
            continue
        emit(event="start", exercise=ex_id)
        result = check(ex_id, fn, seed=args.seed)
        emit(event="result", **asdict(result))
    out.close()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
