"""scripts/run_notebooks.py: two runs side by side (make test) keep each other's rows in runtimes.csv."""

import csv
import threading

from book_modules import load

run_notebooks = load("scripts/run_notebooks.py")


def _row(name, seconds, profile="ci"):
    return {"notebook": name, "profile": profile, "seconds": seconds, "peak_rss_mb": 100, "status": "ok"}


def _read(path):
    with open(path, newline="") as fh:
        return {(r["notebook"], r["profile"]): r["seconds"] for r in csv.DictReader(fh)}


def test_a_second_run_keeps_the_rows_of_the_first_and_replaces_its_own(tmp_path):
    path = tmp_path / "runtimes.csv"
    run_notebooks.write_runtimes(path, [_row("a.ipynb", 1.0), _row("b.ipynb", 2.0)])
    run_notebooks.write_runtimes(path, [_row("b.ipynb", 5.0), _row("c.ipynb", 3.0), _row("a.ipynb", 9.0, "gpu")])
    assert _read(path) == {("a.ipynb", "ci"): "1.0", ("b.ipynb", "ci"): "5.0", ("c.ipynb", "ci"): "3.0",
                           ("a.ipynb", "gpu"): "9.0"}


def test_runs_that_finish_together_lose_no_row(tmp_path):
    path = tmp_path / "runtimes.csv"
    writers = [threading.Thread(target=run_notebooks.write_runtimes, args=(path, [_row(f"nb{i}.ipynb", float(i))]))
               for i in range(16)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert _read(path) == {(f"nb{i}.ipynb", "ci"): f"{float(i)}" for i in range(16)}
