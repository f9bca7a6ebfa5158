"""Command line of the exercises: list them, grade a folder, regenerate the student notebooks.

    python -m companion.exercises list [--chapter N] [--markdown]
    python -m companion.exercises grade SUBMISSIONS_DIR --out grades.csv [--chapter N | --exercise ID ...]
                                        [--timeout SECONDS] [--jobs N] [--seed N]
    python -m companion.exercises student [--check] [--root DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .core import list_exercises


def markdown_table(rows: list[dict]) -> str:
    """The exercises as a Markdown table: chapter, id, level, title, signature."""
    lines = ["| chapter | id | level | title | signature |", "| --- | --- | --- | --- | --- |"]
    for e in rows:
        sig = e["signature"].replace("|", "\\|")
        lines.append(f"| {e['chapter']} | `{e['id']}` | {e['level']} | {e['title']} | `{sig}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.exercises", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="the exercises: id, level, title, signature")
    p_list.add_argument("--chapter", type=int, default=None)
    p_list.add_argument("--markdown", action="store_true", help="a Markdown table (the book's book/_exercise_table.md)")
    p_grade = sub.add_parser("grade", help="grade a folder of .py/.ipynb submissions into a CSV")
    p_grade.add_argument("folder", type=Path)
    p_grade.add_argument("--out", type=Path, required=True, help="the CSV to write (one row per student and exercise)")
    p_grade.add_argument("--chapter", type=int, default=None, help="grade only this chapter's exercises: every file gets a row for each, 'missing' where it lacks the "
                              "function")
    p_grade.add_argument("--exercise", action="append", default=None, help="grade this id (repeatable)")
    p_grade.add_argument("--timeout", type=float, default=300, help="seconds per submission (default 300)")
    p_grade.add_argument("--jobs", type=int, default=2, help="submissions graded at once (default 2)")
    p_grade.add_argument("--seed", type=int, default=None, help="the same cases for every student (default: fresh)")
    p_student = sub.add_parser("student", help="regenerate notebooks/exercises/student/ from the authored notebooks")
    p_student.add_argument("--check", action="store_true", help="write nothing; exit 1 if one is out of date")
    p_student.add_argument("--root", type=Path, default=Path.cwd(), help="the course repository (default: here)")
    args = parser.parse_args(argv)

    if args.command == "list":
        if args.markdown:
            print(markdown_table(list_exercises(args.chapter)), end="")
            return 0
        for e in list_exercises(args.chapter):
            print(f"{e['id']:32s} {e['level']:8s} {e['title']}\n{'':41s}{e['signature']}")
        return 0
    if args.command == "grade":
        from .grade import grade, summary

        start = time.perf_counter()
        try:
            rows = grade(args.folder, args.out, chapter=args.chapter, exercises=args.exercise, timeout=args.timeout,
                         jobs=args.jobs, seed=args.seed)
        except (ValueError, KeyError) as err:
            print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
            return 2
        print(summary(rows, time.perf_counter() - start))
        print(f"wrote {args.out}")
        return 0
    from .student import exercise_notebooks, write_student_notebooks

    if not exercise_notebooks(args.root):
        print(f"error: no notebooks/exercises/ch*_exercises.ipynb under {args.root}: run it from the course "
              "repository or pass --root", file=sys.stderr)
        return 2
    stale = write_student_notebooks(args.root, check_only=args.check)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(args.root)}")
    if args.check and stale:
        print("run `python -m companion.exercises student` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
