"""Grading a folder of submissions: one subprocess per student file, a time limit, a CSV.

    python -m companion.exercises grade SUBMISSIONS_DIR --out grades.csv [--chapter 4] [--timeout 300] [--jobs 2]

A submission is a ``.py`` file or an ``.ipynb`` notebook (the student notebook, filled in). It defines
functions named as the exercises (``quantize_nf4`` for ``ch04.quantize_nf4``). Each file is loaded and graded
in its own Python process (:mod:`companion.exercises.worker`), so a submission that hangs, crashes, prints
without end or calls ``sys.exit`` is recorded as such and the others are graded. The worker writes one JSON
line per event to a results file, so a process killed at the time limit keeps the grades it had finished.

The CSV has one row per student and exercise: ``student, file, exercise, status, passed, cases, seconds,
message``. ``status`` is one of :data:`companion.exercises.STATUSES`, or ``missing`` (the file does not define
the function), ``timeout`` (the time limit ended the process first) or ``crashed`` (the process died).
Which exercises: ``--chapter``/``--exercise`` if given, else every exercise that at least one submission defines.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .core import get_exercise, list_exercises

SUFFIXES = (".py", ".ipynb")
COLUMNS = ("student", "file", "exercise", "status", "passed", "cases", "seconds", "message")
STDERR_TAIL = 2000  # characters of a dead process's stderr kept for the message


@dataclass
class Submission:
    student: str
    path: Path
    defined: list[str] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    running: str | None = None  # the exercise being graded when the process ended
    outcome: str = "ok"  # ok | timeout | crashed
    detail: str = ""
    seconds: float = 0.0


def find_submissions(folder: Path) -> list[Submission]:
    """The ``.py`` and ``.ipynb`` files directly in ``folder``; the student is the file's stem (its name
    when two files share a stem). Raises ``ValueError`` for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass the folder that holds the students' .py or .ipynb files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder} holds no .py or .ipynb files to grade")
    stems = Counter(p.stem for p in files)
    return [Submission(p.stem if stems[p.stem] == 1 else p.name, p) for p in files]


def _drain(stream, keep: list[str]) -> None:
    """Read a pipe to its end, keeping only the last STDERR_TAIL characters (a flood cannot fill memory)."""
    tail = ""
    for chunk in iter(lambda: stream.read(4096), ""):
        tail = (tail + chunk)[-STDERR_TAIL:]
    keep.append(tail)


def run_one(sub: Submission, ids: list[str] | None, timeout: float, seed: int | None) -> Submission:
    """Grade one submission in a subprocess; fill ``sub`` from the worker's JSON lines."""
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        results = Path(tmp) / "results.jsonl"
        cmd = [sys.executable, "-m", "companion.exercises.worker", str(sub.path.resolve()), str(results)]
        if ids is not None:
            cmd += ["--ids", ",".join(ids)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                                start_new_session=True)  # its own process group: killed with its children
        tail: list[str] = []
        reader = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        reader.join(timeout=5)
        sub.seconds = round(time.perf_counter() - start, 2)
        _read_events(sub, results)
        last_err = (tail[0] if tail else "").strip().splitlines()
        if code is None:
            sub.outcome, sub.detail = "timeout", f"the time limit of {timeout:g} s ended the process"
        elif code != 0:
            sub.outcome = "crashed"
            sub.detail = f"the process ended with exit code {code}" + (f": {last_err[-1][:300]}" if last_err else "")
    return sub


def _read_events(sub: Submission, results: Path) -> None:
    if not results.exists():
        return
    for line in results.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if event["event"] == "loaded":
            sub.defined, sub.load_errors = event["defined"], event["load_errors"]
        elif event["event"] == "start":
            sub.running = event["exercise"]
        elif event["event"] == "result":
            sub.results[event["exercise_id"]] = event
            sub.running = None


def rows_for(sub: Submission, ids: list[str]) -> list[dict]:
    """One CSV row per exercise in ``ids`` for this submission."""
    rows = []
    for ex_id in ids:
        row = {"student": sub.student, "file": sub.path.name, "exercise": ex_id, "passed": False, "cases": 0,
               "seconds": 0.0}
        name = get_exercise(ex_id).name
        if ex_id in sub.results:
            r = sub.results[ex_id]
            row.update(status=r["status"], passed=r["passed"], cases=r["cases"], seconds=r["seconds"],
                       message=r["message"])
        elif sub.outcome != "ok" and (sub.running == ex_id or not sub.defined or name in sub.defined):
            where = f" while grading {sub.running}" if sub.running else (" while loading the file" if not sub.defined else "")
            row.update(status=sub.outcome, message=f"{sub.detail}{where}")
        else:
            errors = f" (errors while loading: {'; '.join(sub.load_errors)[:500]})" if sub.load_errors else ""
            row.update(status="missing", message=f"the file defines no function named {name}{errors}")
        rows.append(row)
    return rows


def grade(folder, out, *, chapter: int | None = None, exercises: list[str] | None = None, timeout: float = 300,
          jobs: int = 2, seed: int | None = None, progress: bool = True) -> list[dict]:
    """Grade every submission in ``folder`` and write the CSV ``out``; return its rows.

    ``timeout`` is seconds per submission (loading and every exercise together); ``jobs`` submissions
    are graded at once. ``seed`` makes every student get the same cases (default: fresh ones each).
    """
    from tqdm.auto import tqdm

    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    ids = None
    if exercises:
        ids = [get_exercise(e).id for e in exercises]  # KeyError lists the valid ids
    elif chapter is not None:
        ids = [e["id"] for e in list_exercises(chapter)]
    subs = find_submissions(Path(folder))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, s, ids, timeout, seed) for s in subs]
        for f in tqdm(futures, total=len(futures), desc="grading", unit="file", disable=not progress):
            f.result()
    if ids is None:  # every exercise some submission defines
        names = {n for s in subs for n in s.defined}
        ids = [e["id"] for e in list_exercises() if e["id"].split(".", 1)[1] in names]
    rows = [row for s in subs for row in rows_for(s, ids)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def summary(rows: list[dict], seconds: float) -> str:
    students = len({r["student"] for r in rows})
    counts = Counter(r["status"] for r in rows)
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return (f"graded {students} submissions x {len({r['exercise'] for r in rows})} exercises in {seconds:.0f} s: "
            f"{parts}")
