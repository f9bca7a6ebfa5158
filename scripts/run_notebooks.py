"""Execute the course notebooks with papermill in one profile and log cost per notebook.

    python scripts/run_notebooks.py --profile ci            # CI: every notebook and exercise notebook, CPU, offline
    python scripts/run_notebooks.py --profile gpu           # a CUDA machine (GitHub workflow)
    python scripts/run_notebooks.py notebooks/ch01_*.ipynb  # a subset

Executed copies go to ``_build/executed/<profile>/``; a CSV there records seconds and
the sampled peak resident memory of each notebook's kernel. In the ``ci`` profile (the
notebooks' default, so no parameter is injected) each executed notebook is also stored
in the Jupyter Book execution cache, so the book build that follows re-uses it instead
of running it a second time. Exit status 1 if any notebook fails.

Two runs may share the output folder at the same time (``make test`` runs two subsets side by
side): each writes its own executed copies, the cache is written under a file lock
(``filelock``), and the CSV keeps the rows of notebooks the other run executed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from pathlib import Path

import papermill
import psutil
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"  # same path as execute.cache in _config.yml


class PeakRSS:
    """Sample the resident memory of this process's children (the kernel) in a thread."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def default_profile(path: Path) -> str | None:
    """The PROFILE value assigned in the notebook's cell tagged ``parameters``."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            for line in "".join(cell["source"]).splitlines():
                if line.replace(" ", "").startswith("PROFILE="):
                    return line.split("=", 1)[1].split("#")[0].strip().strip("'\"")
    return None


def store_in_book_cache(executed: Path, source: Path) -> None:
    """Put an executed notebook into the jupyter-cache that ``jupyter-book build`` reads.

    jupyter-cache matches notebooks by a hash of their code and cell metadata, and papermill
    adds metadata to every cell, so the outputs are copied into the *source* notebook first.
    """
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    nb = nbformat.read(str(source), nbformat.NO_CONVERT)
    ran = nbformat.read(str(executed), nbformat.NO_CONVERT)
    if len(nb.cells) != len(ran.cells):
        return  # parameters were injected: not the book's notebook, nothing to cache
    for cell, done in zip(nb.cells, ran.cells):
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = done.outputs, done.execution_count
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE.parent / ".jupyter_cache.lock")):
        get_cache(str(CACHE)).cache_notebook_bundle(CacheBundleIn(nb, str(source.resolve())),
                                                    check_validity=False, overwrite=True)


def write_runtimes(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to the CSV at ``path``, keeping the rows of other notebooks already there.

    A notebook run again replaces its old row; the file is rewritten under a file lock, so two
    runs that finish together both keep their rows.
    """
    with FileLock(str(path) + ".lock"):
        kept = {}
        if path.is_file():
            with open(path, newline="") as fh:
                kept = {(r["notebook"], r["profile"]): r for r in csv.DictReader(fh)}
        kept.update({(r["notebook"], r["profile"]): r for r in rows})
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(sorted(kept.values(), key=lambda r: (r["profile"], r["notebook"])))


def gpu_timeout(nb: Path, floor: int = 900, factor: float = 3.0) -> int:
    """Seconds per cell for a ``gpu`` run: ``factor`` x the notebook's T4 estimate of its defaults
    (``companion.budget_plans``), and at least ``floor``: no cell may take longer than three times
    the estimate of the whole notebook."""
    from companion.budget_plans import notebook_estimate, notebook_parameters

    if nb.parent.name == "exercises":  # grading runs on the CPU in seconds, in either profile
        return floor
    minutes = notebook_estimate(nb.stem, **notebook_parameters(nb)).minutes
    return max(floor, round(factor * 60 * minutes))


def run(notebooks: list[Path], profile: str, out_dir: Path, timeout: int | None) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for nb in notebooks:
        default = default_profile(nb)
        if default is None:
            raise SystemExit(f"{nb}: no `PROFILE = ...` line in a cell tagged 'parameters'")
        params = {} if profile == default else {"PROFILE": profile}
        target = out_dir / nb.name
        cell_timeout = timeout or (gpu_timeout(nb) if profile == "gpu" else 1800)
        print(f"[{profile}] {nb.relative_to(ROOT)} (cell timeout {cell_timeout} s) ...", flush=True)
        start, status = time.perf_counter(), "ok"
        with PeakRSS() as mem:
            try:
                papermill.execute_notebook(str(nb), str(target), parameters=params, cwd=str(nb.parent),
                                           execution_timeout=cell_timeout, progress_bar=False,
                                           kernel_name="python3")
            except Exception as err:  # papermill marks the failing cell in the output notebook
                status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        seconds = time.perf_counter() - start
        if status == "ok" and not params:
            store_in_book_cache(target, nb)
        rows.append({"notebook": nb.name, "profile": profile, "seconds": round(seconds, 1),
                     "peak_rss_mb": round(mem.peak / 2**20), "status": status})
        print(f"    {status} in {seconds:.0f} s, peak kernel RSS {mem.peak / 2**20:.0f} MiB", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="default: notebooks/ch*.ipynb and the exercises, notebooks/exercises/ch*.ipynb")
    parser.add_argument("--profile", choices=("ci", "gpu"), default="ci")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds per cell; default 1800 in ci (as _config.yml), in gpu 3x the notebook's T4 estimate")
    parser.add_argument("--out", type=Path, default=None, help="default: _build/executed/<profile>")
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or (sorted((ROOT / "notebooks").glob("ch*.ipynb"))
                                                          + sorted((ROOT / "notebooks" / "exercises").glob("ch*.ipynb")))
    out_dir = args.out or ROOT / "_build" / "executed" / args.profile
    rows = run(notebooks, args.profile, out_dir, args.timeout)
    write_runtimes(out_dir / "runtimes.csv", rows)
    failed = [r for r in rows if r["status"] != "ok"]
    total = sum(r["seconds"] for r in rows)
    print(f"{len(rows) - len(failed)}/{len(rows)} notebooks ran in the {args.profile} profile "
          f"({total:.0f} s); log: {out_dir / 'runtimes.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
