"""The T4 budget of every notebook's gpu defaults: print the table, or write each header's estimate line.

    python scripts/t4_budget.py                 # one row per notebook, then its runs
    python scripts/t4_budget.py --write         # rewrite the "**T4 budget.**" line of every header
    python scripts/t4_budget.py --write notebooks/ch05_qlora_finetune.ipynb   # only these notebooks

Estimates come from companion.budget_plans (memory: companion.memory.footprint; time: a FLOPs count at an
assumed throughput, see companion.budget). --write touches only the first (header) cell: it replaces the
line that starts with "**T4 budget.**", or adds that paragraph before the "**Colab.**" line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from companion.budget import BUDGET_MINUTES, T4  # noqa: E402
from companion.budget_plans import estimate_line, notebook_estimate, notebook_parameters, plan  # noqa: E402

PREFIX = "**T4 budget.** "
NOTE = ("(computed by `companion.budget_plans`: memory from `companion.memory.footprint`, time from a FLOPs count at "
        "an assumed throughput; an estimate, not a measurement, downloads not included).")
LINE = re.compile(r"^\*\*T4 budget\.\*\* .*$", re.MULTILINE)


def header_paragraph(notebook: str) -> str:
    """The two lines the header of ``notebook`` carries for its gpu defaults."""
    params = notebook_parameters(ROOT / "notebooks" / f"{notebook}.ipynb")
    return f"{PREFIX}{estimate_line(notebook, **params)}\n{NOTE}"


def write_header(path: Path) -> bool:
    """Put the estimate paragraph into the notebook's first cell; True when the file changed."""
    nb = json.loads(path.read_text())
    header = nb["cells"][0]
    if header["cell_type"] != "markdown":
        raise ValueError(f"{path}: the first cell must be the Markdown header, found a {header['cell_type']} cell")
    source = "".join(header["source"])
    new_line = header_paragraph(path.stem).split("\n")[0]
    if LINE.search(source):
        updated = LINE.sub(lambda _: new_line, source)
    elif "\n**Colab.**" in source:
        updated = source.replace("\n**Colab.**", f"\n{header_paragraph(path.stem)}\n\n**Colab.**", 1)
    else:
        raise ValueError(f"{path}: no '**T4 budget.**' line and no '**Colab.**' paragraph to put one before")
    if updated == source:
        return False
    header["source"] = updated.splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


def table(paths: list[Path]) -> str:
    limits = f"fits (<= {T4.usable_gb:.0f} GB, <= {BUDGET_MINUTES:.0f} min)"
    rows = [f"{'notebook':<26}{'peak GB':>9}{'minutes':>9}  {limits}"]
    for path in paths:
        params = notebook_parameters(path)
        est = notebook_estimate(path.stem, **params)
        rows.append(f"{path.stem:<26}{est.peak_gb:>9.1f}{est.minutes:>9.1f}  {'yes' if est.fits else 'NO'}")
        for run in plan(path.stem, **params):
            rows.append(f"    {run.label:<64} {run.peak_bytes() / 1e9:6.2f} GB {run.seconds() / 60:6.1f} min"
                        f"{f' x{run.repeats}' if run.repeats > 1 else ''}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the estimate line in each header cell")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/ch*.ipynb")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("ch*.ipynb"))
    print(table(paths))
    if args.write:
        for path in paths:
            print(f"{path.name}: {'updated' if write_header(path) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
